"""Trace recorder on tiny random Llama models (fast; no real weights needed)."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.torch import trace_recorder as rec  # noqa: E402
from pipedec_sim.inputs.prompts import Prompt  # noqa: E402
from pipedec_sim.inputs.traces import read_trace, write_trace  # noqa: E402

pytestmark = pytest.mark.real

EOS = 2
VOCAB = 256


def _tiny(layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=EOS, bos_token_id=1,
                      pad_token_id=0, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    # Sharper logits than the default init, so greedy paths are not all near-ties.
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
    return m


@pytest.fixture(scope="module")
def models():
    # Tiny ops: one thread avoids spin-waiting on the shared 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _tiny(3, 0), _tiny(1, 1)
    torch.set_num_threads(old)


def _prompts(n: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        out.append([1] + torch.randint(3, VOCAB, (length,), generator=g).tolist())
    return out


@pytest.fixture(scope="module")
def recorded(models):
    tgt, drf = models
    return rec.record_trace(tgt, drf, None, _prompts(5), top_k=8, max_new_tokens=16,
                            progress=False, dataset="tiny", command="pytest")


def test_validates_and_round_trips(recorded, tmp_path):
    for name in ("t.jsonl", "t.jsonl.gz"):
        path = tmp_path / name
        write_trace(recorded, path)
        back = read_trace(path)
        assert len(back.requests) == 5
        assert back.header.source == "recorded" and back.header.top_k == 8
        assert back.header.extra["versions"]["torch"] == torch.__version__
        for a, b in zip(recorded.requests, back.requests):
            assert a.output == b.output and a.topk_ids == b.topk_ids
            assert b.prompt_ids is not None and len(b.prompt_ids) == b.prompt_len


def test_output_equals_hf_generate(models, recorded):
    tgt, _ = models
    for req in recorded.requests:
        ids = torch.tensor([req.prompt_ids])
        ref = tgt.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                           do_sample=False, eos_token_id=EOS, pad_token_id=0)
        ref = ref[0, ids.shape[1]:].tolist()
        if EOS in ref:
            ref = ref[:ref.index(EOS) + 1]
        assert req.output == ref
        assert EOS not in req.output[:-1]


def test_true_path_proposals_match_direct_draft_forward(models, recorded):
    _, drf = models
    for req in recorded.requests[:3]:
        for j in sorted({0, len(req.output) // 2, len(req.output) - 1}):
            prefix = torch.tensor([req.prompt_ids + req.output[:j]])
            probs = torch.softmax(drf(input_ids=prefix).logits[0, -1].float(), -1)
            p, i = probs.topk(8)
            assert req.topk_ids[j] == i.tolist()
            assert req.topk_probs[j] == pytest.approx(p.tolist(), abs=1e-4)


def test_batched_generation_equals_unbatched(models, recorded):
    tgt, drf = models
    batched = rec.record_trace(tgt, drf, None, _prompts(5), top_k=8, max_new_tokens=16,
                               progress=False, batch_size=4)
    assert [r.output for r in batched.requests] == [r.output for r in recorded.requests]
    assert [r.topk_ids for r in batched.requests] == [r.topk_ids for r in recorded.requests]


def test_repair_regenerates_from_first_wrong_token(models):
    tgt, _ = models
    prompt = _prompts(1, seed=9)[0]
    good = rec.greedy_continue(tgt, prompt, max_new_tokens=12, eos={EOS})
    if len(good) < 4:
        pytest.skip("greedy path too short for this seed")
    bad = good[:3] + [(good[3] + 1) % VOCAB] + good[4:]
    fixed, where = rec.repair(tgt, prompt, bad, max_new_tokens=12, eos={EOS})
    assert where == 3 and fixed == good
    assert rec.repair(tgt, prompt, good, max_new_tokens=12, eos={EOS}) == (good, -1)


def test_text_prompts_use_chat_template(models, tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", bos_token="<s>",
                                  unk_token="<unk>", pad_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<s> w{{ 10 + loop.index }} {{ m['content'] }}"
                         "{% endfor %}{% if add_generation_prompt %} w99{% endif %}")
    ids = rec.encode_prompt(tok, "w5 w6")
    assert ids == [1, 11, 5, 6, 99]
    assert rec.encode_prompt(tok, "w5 w6", chat=False) == [5, 6]
    tgt, drf = models
    tr = rec.record_trace(tgt, drf, tok, [Prompt("a", "w5 w6", "x"), Prompt("b", "w7", "x")],
                          top_k=4, max_new_tokens=5, progress=False)
    assert [r.id for r in tr.requests] == ["a", "b"]
    assert tr.requests[0].prompt_ids == ids
    assert tr.header.extra["chat_template"] is True


def test_cli_records_a_prompt_file(models, tmp_path, capsys):
    tgt, drf = models
    tdir, ddir = tmp_path / "tgt", tmp_path / "drf"
    tgt.save_pretrained(tdir)
    drf.save_pretrained(ddir)
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", bos_token="<s>",
                            unk_token="<unk>").save_pretrained(tdir)
    pfile = tmp_path / "p.txt"
    pfile.write_text("w5 w6 w7\nw8 w9\nw10\n")
    out = tmp_path / "o.jsonl.gz"
    rc = rec.main(["--target", str(tdir), "--draft", str(ddir), "--prompts", str(pfile),
                   "--out", str(out), "--top-k", "4", "--max-new-tokens", "6",
                   "--max-requests", "2", "--batch-size", "2"])
    assert rc == 0
    tr = read_trace(out)
    assert len(tr.requests) == 2 and tr.header.top_k == 4
    assert "--max-requests" in tr.header.command
    assert "[trace] 2/2 requests" in capsys.readouterr().err
    bad = rec.main(["--target", str(tdir), "--draft", str(tmp_path / "nope"), "--prompts",
                    str(pfile), "--out", str(out)])
    assert bad == 2
    json.loads(gzip_first_line(out))


def gzip_first_line(path) -> str:
    import gzip
    with gzip.open(path, "rt") as f:
        return f.readline()
