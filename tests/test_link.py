"""Which transport carries activations between stages (`backends/torch/link.py`)."""
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from backends.torch import link  # noqa: E402
from pipedec_sim.errors import InputError  # noqa: E402

GPU = [("node0", "cuda:0"), ("node0", "cuda:1"), ("node1", "cuda:0")]


def test_cpu_runs_use_gloo():
    assert link.choose("auto", "cpu", [("h", "cpu")] * 3)[0] == "gloo"


def test_one_gpu_per_stage_uses_nccl_across_hosts_too():
    assert link.choose("auto", "cuda", GPU) == ("nccl", "nccl: one GPU per stage")
    assert link.choose("nccl", "cuda", GPU)[0] == "nccl"
    assert link.choose("gloo", "cuda", GPU)[0] == "gloo"


def test_stages_sharing_a_gpu_fall_back_to_gloo_and_say_which():
    places = [("h", "cuda:0"), ("h", "cuda:1"), ("h", "cuda:0")]
    kind, why = link.choose("auto", "cuda", places)
    assert kind == "gloo" and "stages 1 and 3 share cuda:0" in why
    with pytest.raises(InputError) as e:
        link.choose("nccl", "cuda", places)
    assert e.value.field == "--transport"


def test_a_single_stage_has_no_stage_links():
    assert link.choose("auto", "cuda", [("h", "cuda:0")])[0] == "gloo"


def test_rank_devices(monkeypatch):
    monkeypatch.setattr(link.torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert [str(link.rank_device("cuda", r)) for r in range(4)] == [
        "cuda:0", "cuda:0", "cuda:1", "cuda:0"]          # head shares stage 1's GPU
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert str(link.rank_device("cuda", 7)) == "cuda:1"
    assert str(link.rank_device("cpu", 7)) == "cpu"


def test_nccl_on_cpu_is_a_flag_error(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    r = subprocess.run([sys.executable, "-m", "backends.torch.cli", "run", "--target", "tiny",
                        "--strategies", "ar", "--prompts", str(prompts), "--transport", "nccl"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--transport" in r.stderr, r.stderr


def test_a_batch_travels_as_one_payload_and_unpacks_to_the_same_values():
    """Over gloo a batch's rows and hidden states are one byte payload (`wire.pack`); its
    views give back exactly the rows and float32 values that were packed."""
    import torch

    from backends.torch import wire
    rows = torch.tensor([[7, 3, 42, 9], [8, 7, 5, 10], [2**40, -1, 0, 11]], dtype=torch.int64)
    hidden = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    buf = wire.pack(rows, hidden)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * 4 * 8 + 3 * 6 * 4
    r, h = wire.unpack(buf, 3, 6)
    assert torch.equal(r, rows) and torch.equal(h, hidden)
    t = wire.pack_tokens(rows, torch.tensor([4, 5, 6]))
    assert torch.equal(t[:12].view(3, 4), rows) and t[12:].tolist() == [4, 5, 6]


@pytest.mark.parametrize("hidden_rows", [2, 40])       # fits its frame / spills
def test_messages_are_framed_and_read_back_tensor_by_tensor(monkeypatch, hidden_rows):
    """`wire.frame` puts a message's leading tensors in one fixed-size frame as far as
    they fit (a message that fits is one gloo operation) and sends the rest as they are;
    `wire.recv` gives the receiver the same tensors in order either way, and the next
    message starts a new frame."""
    import torch

    from backends.torch import wire
    from tests.helpers import wire_loopback
    h = wire.header(wire.BATCH, 3, id=9, n=hidden_rows)
    rows = torch.arange(hidden_rows * 4, dtype=torch.int64).view(hidden_rows, 4)
    hidden = torch.randn(hidden_rows, 100)
    sent = wire.frame([h, rows, hidden], wire.TAG_DATA)
    sent += wire.frame([wire.header(wire.STOP, 3)], wire.TAG_DATA)
    assert len(sent) == (2 if hidden_rows == 2 else 3)        # spilled: only the hidden
    assert all(t.numel() == wire.FRAME_WORDS[wire.TAG_DATA] for t in sent[::len(sent) - 1])
    wire_queue = list(sent)
    wire_loopback(monkeypatch, wire_queue)
    got = wire.recv(wire.HEADER_LEN, torch.int64, 0)
    assert torch.equal(got, h)
    assert torch.equal(wire.recv((hidden_rows, 4), torch.int64, 0), rows)
    assert torch.equal(wire.recv((hidden_rows, 100), torch.float32, 0), hidden)
    assert int(wire.recv(wire.HEADER_LEN, torch.int64, 0)[wire.KIND]) == wire.STOP
    assert not wire_queue and not wire._reading
