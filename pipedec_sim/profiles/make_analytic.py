"""Regenerate the bundled analytic profiles.

    python -m pipedec_sim.profiles.make_analytic [--out DIR]

Writes analytic-llama70b-1b.json (10 GbE) and analytic-llama70b-1b-100gbe.json (100 GbE)
from `pipedec_sim.inputs.profile.analytic_profile`; see that function for the formula.
For a profile of your own cluster (any catalogue GPU, model shape, servers and links) use
`pipedec-sim profile analytic` instead.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipedec_sim.inputs.profile import PROFILES_DIR, analytic_profile, save_profile

VARIANTS = {
    "analytic-llama70b-1b": {"link_gbps": 10.0, "link_latency_ms": 0.05},
    "analytic-llama70b-1b-100gbe": {"link_gbps": 100.0, "link_latency_ms": 0.01},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=PROFILES_DIR, help="output directory")
    args = ap.parse_args(argv)
    for name, link in VARIANTS.items():
        data = analytic_profile(**link)
        data["name"] = name
        path = args.out / f"{name}.json"
        save_profile(data, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
