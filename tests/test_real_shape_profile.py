"""`pipedec-real profile --target-shape/--draft-shape`: a measured profile from random-weight
layers of a model's shape (issue 14), no checkpoint needed."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from pipedec_sim.inputs.profile import load_profile  # noqa: E402

pytestmark = pytest.mark.real

TARGET = {"model_type": "llama", "num_hidden_layers": 12, "hidden_size": 128,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
          "vocab_size": 512, "_name_or_path": "toy-target"}
DRAFT = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
         "vocab_size": 512, "tie_word_embeddings": True}


def test_shape_profile_keeps_the_full_layer_count_and_the_command(tmp_path):
    from backends.torch.cli import main as real
    (tmp_path / "t.json").write_text(json.dumps(TARGET))
    (tmp_path / "d.json").write_text(json.dumps(DRAFT))
    out = tmp_path / "shape.json"
    argv = ["profile", "--target-shape", str(tmp_path / "t.json"), "--draft-shape",
            str(tmp_path / "d.json"), "--stage-layers", "2", "--quick", "--quiet",
            "--out", str(out)]
    assert real(argv) == 0
    p = load_profile(out)
    assert p.target.layers == 12 and p.target.name == "toy-target (shape)"   # all 12 layers
    assert p.draft.layers == 2 and p.target.dtype_bytes == 4                 # fp32 on CPU
    assert p.provenance["command"] == "pipedec-real " + " ".join(argv)
    notes = p.provenance["notes"]
    assert "times 2 of its 12 layers" in notes and "no checkpoint" in notes
    assert p.layer(4, 64) > 0 and p.draft_step(4, 64) > 0 and p.lm_head(4) > 0


@pytest.mark.parametrize("args,needle", [
    (["--target-shape", "llama-3.1-71b", "--draft-shape", "llama-3.2-1b"],
     "presets: llama-3.1-8b"),
    (["--target-shape", "llama-3.1-8b", "--draft-shape", "qwen2.5-0.5b"], "vocab"),
    (["--target", "tiny", "--draft", "tiny-draft", "--dtype", "bf16"], "--dtype"),
    (["--target", "tiny", "--draft", "tiny-draft", "--stage-layers", "2"], "--stage-layers"),
])
def test_bad_shape_flags_exit_2(tmp_path, capsys, args, needle):
    from backends.torch.cli import main as real
    assert real(["profile", *args, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
