"""A seeded parametric acceptance model: a calibrated stand-in for a draft model.

Per output position the draft's confidence c ~ Beta(alpha, beta). Its top-k probabilities are
geometric, p_r = c * (1 - c)^r, and the true (target) token's rank is drawn from those same
probabilities, with the remaining mass (1 - c)^k outside the top-k. The draft is therefore
calibrated: P(true == top-1) = E[c] = alpha / (alpha + beta), and tree policies that rank nodes
by cumulative log-prob see confidences that mean what they say.

Used to make synthetic traces (no real models needed) and to run prompt-only files; fit it
from recorded traces with `fit_acceptance`.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import random
import statistics

from pipedec_sim.atomic import write_bytes
from pipedec_sim.errors import InputError
from pipedec_sim.inputs.acceptance_model import KIND, AcceptanceModel
from pipedec_sim.inputs.files import FilePath, load_json, read_text
from pipedec_sim.inputs.limits import MAX_OUTPUT_LEN, MAX_PROMPT_LEN
from pipedec_sim.inputs.traces import (
    Trace,
    TraceHeader,
    TraceRequest,
    is_trace_file,
    read_trace,
    trace_sampling,
)

DEFAULT_ACCEPTANCE = AcceptanceModel(
    alpha=4.0, beta=1.2, top_k=16, name="synthetic-default",
    source="hand-set: top-1 agreement ~0.77, typical of a 1B draft for a 70B Llama "
           "(EAGLE/SpecInfer reports); replace with a fitted model")


# ----------------------------------------------------------------------------- fitting

def fit_acceptance(traces: list[Trace], *, name: str = "") -> AcceptanceModel:
    """Beta fit: mean = the recorded top-1 agreement, spread = the recorded confidences'.

    Under the model the top-1 probability *is* c and P(top-1 right) = E[c]. Real drafts are
    often miscalibrated (a distilled draft is overconfident), and acceptance is what the
    simulator must get right, so the mean is the recorded agreement while the concentration
    alpha + beta comes from the method of moments on the top-1 probabilities. `source`
    records both means.
    """
    if not traces:
        raise InputError("need at least one trace to fit an acceptance model")
    top1 = [row[0] for t in traces for r in t.requests for row in r.topk_probs]
    hits = sum(ids[0] == tok for t in traces for r in t.requests
               for ids, tok in zip(r.topk_ids, r.output))
    where = ", ".join(t.path or "<memory>" for t in traces)
    if len(top1) < 2:
        raise InputError(f"need at least 2 output positions to fit, got {len(top1)}", file=where)
    mean, var = statistics.fmean(top1), statistics.pvariance(top1)
    if not 0.0 < mean < 1.0 or not 0.0 < var < mean * (1.0 - mean):
        raise InputError(f"top-1 probabilities (mean {mean:.4g}, variance {var:.4g}) admit no Beta "
                         "fit", file=where, field="draft_probs")
    common = mean * (1.0 - mean) / var - 1.0
    agree = min(max(hits / len(top1), 1e-3), 1.0 - 1e-3)
    top_k = min(t.header.top_k for t in traces)
    max_id = max(max(max(r.output), max(max(row) for row in r.topk_ids))
                 for t in traces for r in t.requests)
    h = traces[0].header
    temps = {trace_sampling(t.header).temperature for t in traces}
    if len(temps) > 1:
        raise InputError(f"traces sampled at different temperatures ({sorted(temps)}): fit "
                         "one model per temperature", file=where)
    source = (f"method-of-moments Beta fit to {len(top1)} top-1 draft probabilities from {where} "
              f"(target {h.target}, draft {h.draft}); mean set to the recorded top-1 "
              f"agreement {hits / len(top1):.3f} (mean top-1 probability {mean:.3f})")
    return AcceptanceModel(alpha=agree * common, beta=(1.0 - agree) * common, top_k=top_k,
                           vocab=max(max_id + 1, top_k + 1),  # a lower bound on the real vocab
                           name=name or f"fitted:{os.path.basename(traces[0].path or 'trace')}",
                           source=source, target=h.target, draft=h.draft,
                           temperature=temps.pop())


def save_acceptance(model: AcceptanceModel, path: FilePath) -> None:
    write_bytes(path, (json.dumps(model.to_dict(), indent=2) + "\n").encode("utf-8"))


BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "acceptance_models")
# Prompt formats with a model fitted on the same data set; other formats (Alpaca, plain
# lines) get the ShareGPT one: general chat prompts.
FITTED_FOR_FORMAT = {"mtbench": "mtbench", "humaneval": "humaneval", "gsm8k": "gsm8k",
                     "sharegpt": "sharegpt"}


def bundled_acceptance() -> dict[str, str]:
    """Fitted models shipped with the package, by name (file stem)."""
    if not os.path.isdir(BUNDLED_DIR):
        return {}
    return {f[:-5]: os.path.join(BUNDLED_DIR, f) for f in sorted(os.listdir(BUNDLED_DIR))
            if f.endswith(".json")}


def acceptance_for_format(fmt: str, temperature: float = 0.0) -> AcceptanceModel:
    """The default model for a prompt file: fitted on the same data set where we have one
    (ShareGPT's otherwise), at the target's sampling `temperature`: `<name>` was fitted on
    greedy traces, `<name>-t<T>` on traces sampled at T."""
    bundled = bundled_acceptance()
    name = FITTED_FOR_FORMAT.get(fmt, "sharegpt")
    if temperature == 0:
        return load_acceptance(bundled[name]) if name in bundled else DEFAULT_ACCEPTANCE
    key = f"{name}-t{temperature:g}"
    if key in bundled:
        return load_acceptance(bundled[key])
    have = sorted({0.0} | {load_acceptance(p).temperature for k, p in bundled.items()
                           if k.startswith(f"{name}-t")})
    raise InputError(f"no bundled acceptance model for {name} prompts at temperature "
                     f"{temperature:g} (bundled: {', '.join(f'{t:g}' for t in have)}); fit one "
                     f"from a trace recorded at that temperature (pipedec-real trace "
                     f"--temperature {temperature:g}) and pass it with --acceptance",
                     field="--temperature")


def load_acceptance(path: FilePath) -> AcceptanceModel:
    """Read an acceptance-model JSON file (or a bundled model's name: mtbench, humaneval,
    gsm8k, sharegpt, the llama70b-1b-proxy and llama8b-1b-proxy proxies, synthetic-default);
    a trace file is accepted too and fitted on the fly."""
    spec = os.fspath(path)
    if spec == DEFAULT_ACCEPTANCE.name:
        return DEFAULT_ACCEPTANCE
    if not os.path.lexists(spec):
        bundled = bundled_acceptance()
        if spec not in bundled:
            names = ", ".join([DEFAULT_ACCEPTANCE.name, *sorted(bundled)])
            raise InputError(f"no such file, and not a bundled acceptance model (bundled: "
                             f"{names})", file=spec, field="--acceptance")
        path = bundled[spec]
    if is_trace_file(path):
        return fit_acceptance([read_trace(path)])
    d = load_json(read_text(path), file=path)
    return AcceptanceModel.from_dict(d, file=path)


# ----------------------------------------------------------------------------- synthetic traces

_LENGTH_LIMITS = {"prompt_len": MAX_PROMPT_LEN, "output_len": MAX_OUTPUT_LEN}


def _draw_len(spec: int | tuple[int, int], rng: random.Random, name: str) -> int:
    limit = _LENGTH_LIMITS[name]
    if isinstance(spec, tuple):
        lo, hi = spec
        if not 1 <= lo <= hi <= limit:
            raise InputError(f"need 1 <= low <= high <= {limit}, got {spec}", field=name)
        return rng.randint(lo, hi)
    if not 1 <= spec <= limit:
        raise InputError(f"must be in [1, {limit}], got {spec}", field=name)
    return spec


def _sample_request(rid: str, prompt_len: int, n: int, model: AcceptanceModel,
                    rng: random.Random, decimals: int | None) -> TraceRequest:
    output, ids, probs = [], [], []
    for _ in range(n):
        row_ids, row_probs, true = model.sample_position(rng)
        if decimals is not None:
            row_probs = [round(p, decimals) for p in row_probs]
        output.append(true)
        ids.append(row_ids)
        probs.append(row_probs)
    return TraceRequest(id=rid, prompt_len=prompt_len, output=output, topk_ids=ids,
                        topk_probs=probs)


def _request_rng(seed: int, i: int) -> random.Random:
    # One stream per request: the first N requests are the same whatever `requests` is.
    return random.Random(f"pipedec-synthetic/{seed}/{i}")


def synthetic_trace(*, requests: int, output_len: int | tuple[int, int],
                    prompt_len: int | tuple[int, int],
                    model: AcceptanceModel = DEFAULT_ACCEPTANCE, seed: int = 0,
                    dataset: str = "synthetic", command: str = "", target: str = "synthetic",
                    draft: str = "synthetic", notes: str = "", created: str | None = None,
                    decimals: int | None = 4) -> Trace:
    """A trace drawn from `model`; identical for identical arguments (no global random state).

    Lengths are fixed ints or inclusive (low, high) uniform ranges. Probabilities are rounded
    to `decimals` to keep files small (None keeps full precision).
    """
    if requests < 1:
        raise InputError(f"must be >= 1, got {requests}", field="requests")
    reqs = []
    for i in range(requests):
        rng = _request_rng(seed, i)
        p_len = _draw_len(prompt_len, rng, "prompt_len")
        n = _draw_len(output_len, rng, "output_len")
        reqs.append(_sample_request(str(i), p_len, n, model, rng, decimals))
    header = TraceHeader(source="synthetic", target=target, draft=draft,
                         tokenizer=f"none (random ids in [0, {model.vocab}))", dataset=dataset,
                         top_k=model.top_k, command=command,
                         created=created or _dt.date.today().isoformat(),
                         acceptance_model=model.to_dict(),
                         notes=notes or f"synthetic: drawn from acceptance model "
                                        f"{model.name or KIND} with seed {seed}")
    return Trace(header=header, requests=reqs)


def trace_from_prompts(prompts: list, *, model: AcceptanceModel, max_new_tokens: int,
                       seed: int, chars_per_token: float = 4.0, dataset: str | None = None,
                       command: str = "") -> Trace:
    """A synthetic trace whose lengths come from real prompts (estimated from characters).

    prompt_len = ceil(len(text) / chars_per_token); the output length is the reference answer's
    estimated length clipped to max_new_tokens, or max_new_tokens when there is no reference.
    """
    if not prompts:
        raise InputError("no prompts")
    if not 1 <= max_new_tokens <= MAX_OUTPUT_LEN:
        raise InputError(f"must be in [1, {MAX_OUTPUT_LEN}] (the limit), got {max_new_tokens}",
                         field="max_new_tokens")
    if not chars_per_token > 0:
        raise InputError(f"must be > 0, got {chars_per_token}", field="chars_per_token")
    reqs = []
    for i, p in enumerate(prompts):
        p_len = max(1, math.ceil(len(p.text) / chars_per_token))
        if p_len > MAX_PROMPT_LEN:
            raise InputError(f"prompt {p.id!r} is about {p_len} tokens long, more than the "
                             f"limit of {MAX_PROMPT_LEN}", field="prompt")
        n = max_new_tokens
        if p.reference:
            n = max(1, min(max_new_tokens, math.ceil(len(p.reference) / chars_per_token)))
        reqs.append(_sample_request(p.id, p_len, n, model, _request_rng(seed, i), decimals=4))
    names = dataset or ", ".join(dict.fromkeys(p.dataset for p in prompts))
    header = TraceHeader(
        source="synthetic", target="unspecified", draft=f"acceptance model {model.name or KIND}",
        tokenizer=f"none (lengths estimated at {chars_per_token:g} chars/token)", dataset=names,
        top_k=model.top_k, command=command, created=_dt.date.today().isoformat(),
        acceptance_model=model.to_dict(),
        notes=(f"prompt lengths (and output lengths where a reference answer exists, else "
               f"max_new_tokens={max_new_tokens}) estimated from characters at "
               f"{chars_per_token:g} chars/token; draft proposals drawn from acceptance model "
               f"{model.name or KIND} ({model.source or 'no source given'}) with seed {seed}"))
    return Trace(header=header, requests=reqs)
