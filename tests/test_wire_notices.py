"""The wire's batched prune notices and reused receive frames (`backends/torch/wire.py`),
and the simulator's price for a control message (`backends/simulated/reference.py`)."""
import pytest

torch = pytest.importorskip("torch")

from backends.torch import wire  # noqa: E402
from pipedec_sim.protocol.messages import Update  # noqa: E402
from tests.helpers import wire_loopback as _loopback  # noqa: E402


def test_one_message_carries_several_notices_in_order(monkeypatch):
    """An event's notices (several requests' in serving) travel as ONE UPDATE message; the
    receiver gets them back in order, the notices without ids left out."""
    pairs = [(3, Update(commit=(7,), kill=(8, 9))), (3, Update()), (5, Update(kill=(2**40,))),
             (3, Update(commit=(11, 12)))]
    message = wire.notices(pairs)
    assert len(message) == 2 and int(message[0][wire.KIND]) == wire.UPDATE
    assert int(message[0][wire.N]) == 3 and int(message[0][wire.REQ]) == 3
    sent = wire.frame(message, wire.TAG_CTRL)
    assert len(sent) == 1                                  # one gloo operation
    _loopback(monkeypatch, sent)
    h = wire.recv(wire.HEADER_LEN, torch.int64, 0, wire.TAG_CTRL)
    got, again = wire.recv_notices(h, 0, wire.TAG_CTRL)
    assert got == [p for p in pairs if wire.has_ids(p[1])]
    assert all(torch.equal(a, b) for a, b in zip(again, message))   # passed on unchanged
    assert wire.notices([(1, Update())]) == []


def test_a_received_tensor_is_not_clobbered_by_the_next_receive(monkeypatch):
    """Every message of a (source, tag) stream lands in one reused frame: a plain read is a
    view valid until the next message, `keep` a copy that stays; hidden states that a
    serving stage holds across receives are the caller's (`Links.recv_batch`)."""
    from backends.torch.link import Links
    rows = torch.arange(8, dtype=torch.int64).view(2, 4)
    hidden = torch.randn(2, 3)
    sent = []
    for k in (1, 2):
        sent += wire.frame([wire.header(wire.BATCH, 1, id=k, n=2),
                            wire.pack(rows * k, hidden * k)], wire.TAG_DATA)
    sent += wire.frame([wire.header(wire.STOP, 1)], wire.TAG_DATA)
    _loopback(monkeypatch, sent)
    links = Links(1, "gloo", torch.device("cpu"), 3, torch.float32)
    h1 = wire.recv(wire.HEADER_LEN, torch.int64, 0)
    k1 = h1.clone()
    _, x1 = links.recv_batch(2, 0)
    h2 = wire.recv(wire.HEADER_LEN, torch.int64, 0, keep=True)
    assert int(h1[wire.ID]) == 2 and int(k1[wire.ID]) == 1    # a view: the next message's
    _, x2 = links.recv_batch(2, 0)
    wire.recv(wire.HEADER_LEN, torch.int64, 0)                # STOP: the frame again
    assert int(h2[wire.ID]) == 2 and int(h1[wire.KIND]) == wire.STOP
    assert torch.equal(x1[0], hidden) and torch.equal(x2[0], hidden * 2)   # the caller's
    assert len(wire._frames) == 1 and not sent


def test_a_broadcast_message_costs_its_stage_once_however_many_notices():
    """On a CPU profile a serving step's notices (one dispatch, several requests) reach
    each stage in one control message: one stage_notice_ms per stage, all of them applied
    once it is received, in order."""
    import dataclasses

    from backends.simulated.serve import ServeSim
    from pipedec_sim.inputs.profile import constant_profile

    class Pipe:
        profile = dataclasses.replace(
            constant_profile(layers=4, layer_ms=1.0, draft_ms=0.3, shared_cores=2,
                             link_latency_ms=0.5), stage_notice_ms=2.0)
        S, layers, topology, record, cancel, core_share = 2, [2, 2], "A", True, False, None

    class Server:
        name = "fake"

        def __init__(self, backend):
            self.backend = backend

        def dispatch(self, actions):
            for r, u in actions:
                self.backend.broadcast(r, u)

    sim = ServeSim(Pipe(), Server, lambda r: object(), 2, arrivals_ms=[0.0, 0.0])
    landed = []
    sim._arrive_notice = lambda j, r, u, at: landed.append((j, r, u, at))
    sim.out.worked = lambda actor, start, end, *a: landed.append((actor, start, end))
    sim._dispatch([(0, Update(kill=(1,))), (1, Update(kill=(2,)))])
    sim._dispatch([(0, Update(kill=(3,)))])
    sim.env.run()
    wires = [x for x in landed if str(x[0]).startswith("wire")]
    assert len(wires) == 4                     # two dispatches x two stages, not 3 x 2
    for j in (1, 2):
        mine = [x[1:3] for x in landed if x[0] == j]
        assert mine == [(0, Update(kill=(1,))), (1, Update(kill=(2,))),
                        (0, Update(kill=(3,)))]


def test_the_head_sends_one_events_broadcast_notices_together():
    """The torch head hands its transport the broadcast notices of one dispatch at once
    (one control message per stage), in the strategy's order, and ahead of a batch the
    dispatch injects after them (so no notice leaves later than it would on its own)."""
    from backends.torch.head import Flight, Head, Request, RunRecord
    from pipedec_sim.protocol.messages import Batch, Inject
    from pipedec_sim.protocol.pacing import Pacer

    class Transport:
        sent: list = []

        def broadcast(self, updates):
            self.sent.append(updates)

        def inject(self, batch, notices):
            self.sent.append(batch.id)

    class Holder:
        applied: list = []

        def apply(self, u):
            self.applied.append(u)

    t, draft = Transport(), Holder()
    head = Head(draft, None, t)
    head.flight = Flight(1, Pacer(object(), head), RunRecord("x", Request("r", [1], 1)), 0.0)
    a, b, c = Update(kill=(1,)), Update(commit=(2,), kill=(3,)), Update(kill=(4,))
    head._dispatch([a, b])
    head._dispatch([])
    head._dispatch([c, Inject(Batch(7, (), "layer")), a])
    assert t.sent == [(a, b), (c,), 7, (a,)] and draft.applied == [a, b, c, a]
