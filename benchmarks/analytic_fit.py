"""How well the analytic model (`pipedec-sim profile analytic`) reproduces the measured H100.

    python benchmarks/analytic_fit.py [--profile NAME ...] [--stored]

Fits the efficiency factors of pipedec_sim/inputs/profile/roofline.py to each measured H100
profile (h100-llama70b-1b-kernels: summed kernel time, the default factors; h100-llama70b-1b:
eager wall time, `--efficiency eager`) and prints, for the layer, draft-step and LM-head
grids, the model's error at every grid point (model / measured - 1, in %), then the median
and worst |error| per grid, and the fitted factors beside the ones the package ships.
`--stored` skips the fit and reports the shipped factors' errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipedec_sim.inputs.profile import load_profile  # noqa: E402
from pipedec_sim.inputs.profile.cluster import h100_hardware  # noqa: E402
from pipedec_sim.inputs.profile.fit import FITTED, FitReport, fit_efficiency, report  # noqa: E402
from pipedec_sim.inputs.profile.roofline import EFFICIENCY  # noqa: E402

PROFILES = {"h100-llama70b-1b-kernels": "kernels", "h100-llama70b-1b": "eager"}


def grid_table(rep: FitReport, name: str) -> str:
    pts = rep.grid(name)
    if name == "lm_head":
        return ("tokens  " + " ".join(f"{p.tokens:>6}" for p in pts) + "\n"
                + "err %   " + " ".join(f"{100 * p.rel:>+6.1f}" for p in pts))
    ctx = sorted({p.context for p in pts if p.context is not None})
    lines = ["tokens \\ context " + " ".join(f"{c:>7}" for c in ctx)]
    for n in sorted({p.tokens for p in pts}):
        row = {p.context: p.rel for p in pts if p.tokens == n}
        lines.append(f"{n:>16} " + " ".join(f"{100 * row[c]:>+7.1f}" for c in ctx))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="append", choices=tuple(PROFILES),
                    help="measured profile(s) to fit (default both)")
    ap.add_argument("--stored", action="store_true",
                    help="report the shipped factors' errors without refitting")
    args = ap.parse_args(argv)
    hw = h100_hardware()           # the measured card: "NVIDIA H100 80GB HBM3" (SXM5)
    for name in args.profile or PROFILES:
        prof = load_profile(name)
        stored = EFFICIENCY[PROFILES[name]]
        t = time.perf_counter()
        rep = (report(hw, stored, prof) if args.stored
               else fit_efficiency(prof, hw, name=stored.name))
        took = time.perf_counter() - t
        print(f"=== {name} ({prof.provenance['device']}): --efficiency {stored.name}, "
              f"{'shipped factors' if args.stored else f'fitted in {took:.1f} s'}")
        for g in ("layer", "draft_step", "lm_head"):
            print(f"\n{g}: model / measured - 1 (%)")
            print(grid_table(rep, g))
        print("\nsummary |error|:")
        print(f"{'grid':<11} {'points':>6} {'median':>8} {'worst':>8}  worst at")
        for g in ("layer", "draft_step", "lm_head"):
            med, worst = rep.summary(g)
            w = max(rep.grid(g), key=lambda p: abs(p.rel))
            at = f"tokens {w.tokens}" + (f", context {w.context}" if w.context is not None
                                         else "")
            print(f"{g:<11} {len(rep.grid(g)):>6} {100 * med:>7.1f}% {100 * worst:>7.1f}%  {at}")
        print("\nfactors (fitted | shipped):")
        e = rep.efficiency
        for k in FITTED + ("embed_ms", "compact_layer_ms", "head_overhead_ms"):
            print(f"  {k:<18} {getattr(e, k):>10.4g} | {getattr(stored, k):.4g}")
        print(f"  loss {rep.loss:.5f} (shipped: {report(hw, stored, prof).loss:.5f})\n")
        if not args.stored:
            print("  as code: " + repr(dataclasses.replace(e, fitted_to="...")) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
