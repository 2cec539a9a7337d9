"""The acceptance-controlled pair (`eps-pair` / `eps-pair-draft`, backends/torch/eps_pair.py):
its specs parse and round-trip, bad ones are one InputError naming the flag, eps sets the
agreement (0: the draft is always right), stages build exactly their slice of the target,
and every strategy commits exactly HF greedy's output, inline and with real stage processes.
Tiny sizes only (4 layers, hidden 128).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch import eps_pair  # noqa: E402
from backends.torch.checkpoint import load_stage, num_layers  # noqa: E402
from backends.torch.head import Request  # noqa: E402
from backends.torch.inline import InlinePipeline  # noqa: E402
from backends.torch.models import check_pair, load  # noqa: E402
from backends.torch.stage import stage_bounds  # noqa: E402
from pipedec_sim.errors import InputError  # noqa: E402
from pipedec_sim.protocol.strategies import STRATEGIES  # noqa: E402

from .helpers import real_cli  # noqa: E402

pytestmark = pytest.mark.real
SHAPE = "4x128"
DRAFT = f"eps-pair-draft:{SHAPE}"
KNOBS = dict(width=4, topk=4, depth=4, tree_topk=4, total=16, gamma=3)
PROMPTS = ["Hello, world! This is a test.", "abc", "The quick brown fox jumps"]
NEW_TOKENS = 16
# eps for the lossless runs: 0 (every guess right: prunes, compaction) and one that mixes
# hits and misses at this size (test_eps_sets_the_agreement checks that it does).
MIXED_EPS = 0.2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


def greedy(loaded, prompt, n):
    out = loaded.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                                eos_token_id=loaded.eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def argmax_agreement(target, draft, prompt, n=NEW_TOKENS) -> tuple[float, list[int]]:
    """Draft argmax == target argmax at each position of the target's greedy output."""
    ref = greedy(target, prompt, n)
    ids = torch.tensor([prompt + ref])
    with torch.no_grad():
        t = target.model(ids).logits[0, len(prompt) - 1:-1].argmax(-1)
        d = draft.model(ids).logits[0, len(prompt) - 1:-1].argmax(-1)
    return (t == d).float().mean().item(), ref


# ---- specs -------------------------------------------------------------------------------

def test_specs_parse_and_round_trip():
    target, draft = eps_pair.parse("eps-pair"), eps_pair.parse("eps-pair-draft")
    assert (target.layers, target.hidden) == (draft.layers, draft.hidden) == \
        eps_pair.DEFAULT_SHAPE
    assert target.eps == eps_pair.DEFAULT_EPS and draft.is_draft
    assert target.k == draft.k == eps_pair.default_k(target.layers)
    assert target.draft_spec == draft.spec
    for spec in ("eps-pair:4x128", "eps-pair:4x128:0", "eps-pair:8x256:0.125:3",
                 "eps-pair:16x64:1e-05", "eps-pair-draft:4x128", "eps-pair-draft:8x256:3"):
        p = eps_pair.parse(spec)
        assert eps_pair.parse(p.spec) == p, spec
    assert eps_pair.parse("eps-pair:8x256:0.125:3") == eps_pair.EpsPair(8, 256, 3, 0.125)
    assert eps_pair.parse("tiny") is None and eps_pair.parse("eps-pairs") is None
    assert num_layers("eps-pair:8x256:0.5:3") == 8 and num_layers("eps-pair-draft:8x256:3") == 3


@pytest.mark.parametrize("spec, part", [
    ("eps-pair:abc", "shape 'abc' is not LxH"),
    ("eps-pair:4xz", "hidden 'z' is not a whole number"),
    ("eps-pair:1x128", "layers L = 1"),
    ("eps-pair:4x100", "hidden H = 100"),
    ("eps-pair:4x128:big", "EPS 'big' is not a number"),
    ("eps-pair:4x128:-0.5", "EPS = -0.5"),
    ("eps-pair:4x128:0.1:4", "draft layers K = 4"),
    ("eps-pair:4x128:0.1:1:7", "4 fields"),
    ("eps-pair-draft:4x128:0.5", "draft layers K '0.5'"),
])
def test_bad_specs_name_the_part(spec, part):
    with pytest.raises(InputError, match=part):
        eps_pair.parse(spec)


@pytest.mark.parametrize("target, draft, field, message, profile", [
    ("eps-pair:abc", DRAFT, "--target", "is not LxH", True),
    ("eps-pair:4x128", "eps-pair-draft:4x128:9", "--draft", "draft layers K = 9", True),
    # profile times any two models; run checks that the draft is the target's own
    ("eps-pair:4x128", "eps-pair-draft:8x128", "--draft", "is not the draft of eps-pair:4x128:",
     False),
])
def test_bad_specs_exit_2_naming_the_flag(tmp_path, capsys, target, draft, field, message,
                                          profile):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n")
    models = ["--target", target, "--draft", draft]
    runs = [["run", *models, "--prompts", str(prompts), "--inline"]]
    runs += [["profile", *models, "--out", str(tmp_path / "p.json")]] if profile else []
    for argv in runs:
        code, err = real_cli(argv, capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and "Traceback" not in err and len(lines) == 1, (argv, err)
        assert f"field '{field}'" in lines[0] and message in lines[0], (argv, err)


def test_trace_takes_the_specs(tmp_path, capsys):
    """`pipedec-real trace` records the pair (its agreement is the recorder's top-1)."""
    from pipedec_sim.inputs.traces import read_trace
    prompts, out = tmp_path / "p.txt", tmp_path / "t.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    code, err = real_cli(["trace", "--target", "eps-pair:4x128:0", "--draft", DRAFT, "--prompts",
                       str(prompts), "--out", str(out), "--max-new-tokens", "8", "--top-k",
                       "2"], capsys)
    assert code == 0, err
    assert read_trace(out).header.extra["top1_agreement"] == 1.0


# ---- what eps does -----------------------------------------------------------------------

def test_draft_is_the_targets_first_layers():
    """Same embeddings, first K layers, final norm and head: same names, same values."""
    target, draft = load(f"eps-pair:{SHAPE}:{MIXED_EPS}"), load(DRAFT)
    t = target.model.state_dict()
    d = draft.model.state_dict()
    assert d and all(torch.equal(v, t[k]) for k, v in d.items())
    assert draft.config.num_hidden_layers == eps_pair.parse(DRAFT).k
    check_pair(target, draft)                                  # the pair passes


def test_eps_scales_only_the_later_layers_residual_writes():
    """eps = 1 is the unscaled model; other eps scale o_proj and down_proj of layers K.. and
    nothing else (the compute is the same model's)."""
    one = load(f"eps-pair:{SHAPE}:1").model.state_dict()
    half = load(f"eps-pair:{SHAPE}:0.5").model.state_dict()
    k = eps_pair.parse(DRAFT).k
    scaled = [n for n in one if n.endswith(eps_pair.SCALED) and eps_pair._layer(n) >= k]
    assert len(scaled) == 2 * (4 - k)
    for n, v in one.items():
        assert torch.equal(half[n], v * 0.5 if n in scaled else v), n


def test_eps_sets_the_agreement():
    """eps = 0: the draft's argmax is the target's at every position (its later layers add
    exactly nothing); MIXED_EPS: some hits, some misses; eps = 1 mostly misses."""
    draft = load(DRAFT)
    rates = {}
    for eps in (0, MIXED_EPS, 1):
        target = load(f"eps-pair:{SHAPE}:{eps}")
        rates[eps] = [argmax_agreement(target, draft, target.encode(p))[0] for p in PROMPTS]
    assert rates[0] == [1.0] * len(PROMPTS)
    mixed = sum(rates[MIXED_EPS]) / len(PROMPTS)
    assert 0.2 < mixed < 0.95 and sum(rates[1]) / len(PROMPTS) < mixed, rates


# ---- stages ------------------------------------------------------------------------------

@pytest.mark.parametrize("stages", [2, 4])
def test_stage_slices_equal_the_full_model(stages):
    spec = f"eps-pair:{SHAPE}:{MIXED_EPS}"
    full = load(spec).model.state_dict()
    bounds = stage_bounds(num_layers(spec), stages)
    seen: set[str] = set()
    for j, (lo, hi) in enumerate(bounds):
        part = load_stage(spec, lo, hi, embed=(j == 0), head=(j == stages - 1))
        layers = part.model.model.layers
        assert all(isinstance(layers[i], torch.nn.Identity) != (lo <= i < hi)
                   for i in range(len(layers)))
        sd = part.model.state_dict()
        assert all(torch.equal(v, full[n]) for n, v in sd.items())
        seen |= set(sd)
    assert seen == set(full)                      # together the stages hold the whole model


# ---- lossless ----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[0, MIXED_EPS], ids=lambda e: f"eps={e}")
def pair(request):
    target, draft = load(f"eps-pair:{SHAPE}:{request.param}"), load(DRAFT)
    prompts = [target.encode(p) for p in PROMPTS]
    return target, draft, prompts, [greedy(target, p, NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_inline_lossless(pair, strategy):
    target, draft, prompts, refs = pair
    pipe = InlinePipeline(target, draft, 2, knobs=KNOBS)
    for i, (prompt, ref) in enumerate(zip(prompts, refs)):
        assert pipe.run(strategy, Request(str(i), prompt, len(ref))).output == ref, i


def test_distributed_lossless():
    """Real stage processes build their slices from the spec alone: the same weights."""
    from backends.torch.runtime import DistributedPipeline
    from backends.torch.worker import StageConfig
    spec = f"eps-pair:{SHAPE}:{MIXED_EPS}"
    target = load(spec)
    prompt = target.encode(PROMPTS[0])
    ref = greedy(target, prompt, NEW_TOKENS)
    with DistributedPipeline(StageConfig(spec, 2, timeout_s=60), DRAFT, knobs=KNOBS) as pipe:
        runs = [pipe.run(s, Request("0", prompt, len(ref))) for s in ("ar", "pipedec")]
    assert [r.output for r in runs] == [ref, ref]
    assert 0 < sum(c[2] for c in runs[1].commits) < len(ref)      # hits and misses
