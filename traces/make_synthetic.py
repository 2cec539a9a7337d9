"""Make a synthetic speculation trace from an acceptance model (no models or data needed).

    python traces/make_synthetic.py --out traces/synthetic-llama70b.jsonl

regenerates the bundled file (only the header's `created` date changes). Pass --acceptance to
draw from a fitted model instead of the hand-set default.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipedec_sim.errors import InputError  # noqa: E402
from pipedec_sim.inputs.acceptance import (  # noqa: E402
    DEFAULT_ACCEPTANCE,
    load_acceptance,
    synthetic_trace,
)
from pipedec_sim.inputs.traces import write_trace  # noqa: E402


def _length(text: str) -> int | tuple[int, int]:
    """`256` (fixed) or `64..512` (uniform, inclusive)."""
    try:
        if ".." in text:
            lo, hi = (int(x) for x in text.split("..", 1))
            return lo, hi
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW..HIGH, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output .jsonl or .jsonl.gz")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--output-len", type=_length, default=256, help="N or LOW..HIGH")
    p.add_argument("--prompt-len", type=_length, default=(64, 512), help="N or LOW..HIGH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--acceptance", help="acceptance-model JSON (default: the hand-set model)")
    p.add_argument("--target", default="Llama-3.1-70B (nominal; nothing was run)")
    p.add_argument("--draft", default="Llama-3.2-1B (nominal; proposals drawn from the "
                                      "acceptance model)")
    p.add_argument("--dataset", default="synthetic (no real data; Alpaca-like lengths)")
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    try:
        model = load_acceptance(args.acceptance) if args.acceptance else DEFAULT_ACCEPTANCE
        trace = synthetic_trace(
            requests=args.requests, output_len=args.output_len, prompt_len=args.prompt_len,
            model=model, seed=args.seed, dataset=args.dataset, command=command,
            target=args.target, draft=args.draft,
            notes=(f"synthetic: no model was run. Each position's draft top-{model.top_k} and the "
                   f"true token are drawn from acceptance model {model.name!r} "
                   f"(Beta({model.alpha:g}, {model.beta:g}) confidence, geometric top-k, "
                   f"calibrated rank; {model.source}) with seed {args.seed}; token ids are "
                   f"random; probabilities rounded to 4 decimals. Made by "
                   f"traces/make_synthetic.py."))
        write_trace(trace, args.out)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(len(r.output) for r in trace.requests)
    print(f"wrote {args.out}: {len(trace.requests)} requests, {n} output positions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
