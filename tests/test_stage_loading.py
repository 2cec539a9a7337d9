"""Per-stage checkpoint loading (`backends.torch.checkpoint.load_stage`): each stage reads
only its slice of a safetensors checkpoint, and that slice is bit-identical to the full
model's, holds nothing else, and computes the same hidden states in a `Shard`."""
from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from backends.torch import checkpoint  # noqa: E402
from backends.torch.checkpoint import load_stage  # noqa: E402
from backends.torch.models import keep_layers, load, resolve_path, tiny_model  # noqa: E402
from backends.torch.shard import Shard  # noqa: E402
from backends.torch.stage import stage_bounds  # noqa: E402
from pipedec_sim.errors import InputError  # noqa: E402
from pipedec_sim.protocol.messages import Row  # noqa: E402

pytestmark = pytest.mark.real
SPLITS = [(S, j, lo, hi) for S in (1, 2, 4) for j, (lo, hi) in enumerate(stage_bounds(4, S))]


def save_tokenizer(folder) -> None:
    """A tiny character-level tokenizer, so that HF folders load like real ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"<{i}>": i for i in range(4)} | {chr(97 + i): 4 + i for i in range(26)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<2>",
                            unk_token="<0>").save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """The `tiny` model saved as one safetensors file and as several shards + index."""
    torch.set_num_threads(1)
    model = tiny_model("tiny")
    dirs = {}
    for kind, size in (("single", "1GB"), ("sharded", "1MB")):
        d = tmp_path_factory.mktemp(kind)
        model.save_pretrained(d, safe_serialization=True, max_shard_size=size)
        save_tokenizer(d)
        dirs[kind] = d
    assert (dirs["sharded"] / checkpoint.INDEX_FILE).is_file()
    assert len(list(dirs["sharded"].glob("*.safetensors"))) > 4
    assert (dirs["single"] / checkpoint.SINGLE_FILE).is_file()
    return model, dirs


def reference(lo, hi, *, embed, head):
    """What every stage held before: the full model cut down with `keep_layers`."""
    ref = tiny_model("tiny")
    keep_layers(ref, lo, hi, embed=embed, head=head)
    return ref


def held(model) -> int:
    """Elements of every distinct tensor the model holds (parameters and buffers)."""
    seen = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() for t in seen.values())


def tensors(model) -> dict:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def same_structure(got, ref) -> None:
    inner, rinner = got.model, ref.model
    assert len(inner.layers) == len(rinner.layers) == got.config.num_hidden_layers
    for a, b in zip(inner.layers, rinner.layers):
        assert type(a) is type(b)
    for name in ("embed_tokens", "norm", "rotary_emb"):
        assert (getattr(inner, name) is None) == (getattr(rinner, name) is None), name
    assert (got.lm_head is None) == (ref.lm_head is None)
    assert not got.training


def rows_and_hidden(shards):
    """Run two batches (a prompt, then a small tree) through a chain of shards; returns
    each stage's output hidden states per batch."""
    prompt = [Row(i, i - 1, 5 + 7 * i, i) for i in range(6)]
    tree = [Row(6, 5, 11, 6), Row(7, 5, 13, 6), Row(8, 6, 17, 7)]
    outs = []
    for rows, committed in ((prompt, len(prompt)), (tree, 0)):
        hidden = None
        for sh in shards:
            hidden = sh.forward(rows, committed, hidden)
            outs.append(hidden)
        if shards[-1].has_head:
            outs.append(shards[-1].logits(hidden))
    return outs


@pytest.mark.parametrize("kind", ["single", "sharded"])
@pytest.mark.parametrize("S,j,lo,hi", SPLITS)
def test_stage_matches_full_slice(tiny_dirs, kind, S, j, lo, hi):
    _, dirs = tiny_dirs
    embed, head = j == 0, j == S - 1
    got = load_stage(str(dirs[kind]), lo, hi, embed=embed, head=head).model
    ref = reference(lo, hi, embed=embed, head=head)
    same_structure(got, ref)
    g, r = tensors(got), tensors(ref)
    assert g.keys() == r.keys()
    for name, t in g.items():
        assert not t.is_meta, name
        assert t.dtype == r[name].dtype and torch.equal(t, r[name]), name
    assert held(got) == held(ref)          # nothing beyond the slice was allocated


@pytest.mark.parametrize("S", [1, 2, 4])
def test_stage_shards_compute_like_the_full_model(tiny_dirs, S):
    full, dirs = tiny_dirs
    bounds = stage_bounds(4, S)
    flags = [dict(embed=j == 0, head=j == S - 1) for j in range(S)]
    staged = [Shard(load_stage(str(dirs["sharded"]), lo, hi, **f).model, lo, hi, **f)
              for (lo, hi), f in zip(bounds, flags)]
    whole = [Shard(full, lo, hi, **f) for (lo, hi), f in zip(bounds, flags)]
    for a, b in zip(rows_and_hidden(staged), rows_and_hidden(whole)):
        assert torch.equal(a, b)


def test_loaded_is_interchangeable_with_models_load(tiny_dirs):
    _, dirs = tiny_dirs
    whole = load(str(dirs["single"]))
    stage = load_stage(str(dirs["single"]), 1, 3, embed=False, head=False)
    assert stage.spec == whole.spec and stage.eos == whole.eos == 2
    assert stage.encode("hello") == whole.encode("hello")
    assert stage.config.num_hidden_layers == whole.config.num_hidden_layers == 4
    assert stage.config._attn_implementation == "sdpa"


def test_only_needed_shard_files_are_opened(tiny_dirs, monkeypatch):
    _, dirs = tiny_dirs
    folder = dirs["sharded"]
    weight_map = json.loads((folder / checkpoint.INDEX_FILE).read_text())["weight_map"]
    opened = []
    real = checkpoint.safe_open

    def spy(path, *a, **kw):
        opened.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(checkpoint, "safe_open", spy)
    for j, (lo, hi) in enumerate(stage_bounds(4, 4)):
        opened.clear()
        load_stage(str(folder), lo, hi, embed=j == 0, head=j == 3)
        want = {k for k in weight_map if k.startswith(f"model.layers.{lo}.")}
        want |= {"model.embed_tokens.weight"} if j == 0 else set()
        want |= {"model.norm.weight", "lm_head.weight"} if j == 3 else set()
        files = {str(folder / weight_map[k]) for k in want}
        assert sorted(opened) == sorted(files)           # each needed file, once
        assert len(files) < len(set(weight_map.values()))


def test_missing_tensor_names_file_and_key(tiny_dirs, tmp_path):
    _, dirs = tiny_dirs
    shutil.copytree(dirs["single"], tmp_path, dirs_exist_ok=True)
    file = tmp_path / checkpoint.SINGLE_FILE
    state = load_file(file)
    key = "model.layers.2.mlp.up_proj.weight"
    del state[key]
    save_file(state, file, metadata={"format": "pt"})
    load_stage(str(tmp_path), 0, 2, embed=True, head=False)          # not needed: fine
    with pytest.raises(InputError) as err:
        load_stage(str(tmp_path), 2, 4, embed=False, head=True)
    assert str(file) in str(err.value) and key in str(err.value)


def test_missing_key_in_index_and_bad_shape(tiny_dirs, tmp_path):
    _, dirs = tiny_dirs
    shutil.copytree(dirs["sharded"], tmp_path, dirs_exist_ok=True)
    index = tmp_path / checkpoint.INDEX_FILE
    meta = json.loads(index.read_text())
    del meta["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="model.norm.weight") as err:
        load_stage(str(tmp_path), 3, 4, embed=False, head=True)
    assert str(index) in str(err.value)

    key = "model.layers.0.self_attn.q_proj.weight"
    file = tmp_path / meta["weight_map"][key]
    state = load_file(file)
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(InputError, match="shape") as err:
        load_stage(str(tmp_path), 0, 1, embed=True, head=False)
    assert str(file) in str(err.value) and key in str(err.value)


def test_tiny_specs_keep_the_seeded_path():
    got = load_stage("tiny", 2, 4, embed=False, head=True)
    ref = reference(2, 4, embed=False, head=True)
    same_structure(got.model, ref)
    assert all(torch.equal(t, tensors(ref)[n]) for n, t in tensors(got.model).items())
    assert got.eos is None and got.encode("ab") == [98, 99]


def test_qwen2_tied_head_without_embeddings(tmp_path):
    """Qwen2-style (q/k/v biases) with a tied LM head: a last stage that does not embed
    still reads its head from the embedding tensor, and holds it once."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path, safe_serialization=True)
    save_tokenizer(tmp_path)
    full = load(str(tmp_path)).model
    got = load_stage(str(tmp_path), 2, 3, embed=False, head=True).model
    ref = load(str(tmp_path)).model
    keep_layers(ref, 2, 3, embed=False, head=True)
    assert type(got) is type(full) and got.model.layers[2].self_attn.q_proj.bias is not None
    assert torch.equal(got.lm_head.weight, full.model.embed_tokens.weight)
    assert all(torch.equal(t, tensors(ref)[n]) for n, t in tensors(got).items())
    assert held(got) == held(ref)
    both = load_stage(str(tmp_path), 0, 3, embed=True, head=True).model
    assert both.lm_head.weight is both.model.embed_tokens.weight     # still tied


@pytest.fixture(scope="module")
def smollm2_path():
    try:
        from backends.torch.smollm2 import SmolLM2Missing
        return resolve_path("smollm2")
    except (ImportError, SmolLM2Missing) as e:       # the offline package is optional
        pytest.skip(f"SmolLM2 not available: {e}")


def test_smollm2_middle_stage(smollm2_path):
    torch.set_num_threads(1)
    full = load("smollm2").model
    n = full.config.num_hidden_layers
    lo, hi = stage_bounds(n, 4)[1]
    stage = load_stage("smollm2", lo, hi, embed=False, head=False).model
    fp, got = tensors(full), tensors(stage)
    mine = tuple(f"model.layers.{i}." for i in range(lo, hi)) + ("model.rotary_emb.",)
    assert set(got) == {k for k in fp if k.startswith(mine)}
    assert all(torch.equal(t, fp[n]) for n, t in got.items())
    per_layer = sum(p.numel() for p in full.model.layers[lo].parameters())
    assert sum(p.numel() for p in stage.parameters()) == (hi - lo) * per_layer
    rows = [Row(i, i - 1, 100 + i, i) for i in range(5)]
    hidden = torch.randn(1, len(rows), full.config.hidden_size, generator=torch.Generator()
                         .manual_seed(0))
    a = Shard(stage, lo, hi, embed=False, head=False).forward(rows, len(rows), hidden)
    b = Shard(full, lo, hi, embed=False, head=False).forward(rows, len(rows), hidden)
    assert torch.equal(a, b)
