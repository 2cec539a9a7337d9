"""PipeDec: the draft grows the prediction tree by one layer per pipeline step and the
layer enters stage 1 at once. When the root leaves the last stage the target's token is
known: a hit makes the matching child the root and prunes its siblings on every stage;
a miss flushes the tree and restarts it from the target's token."""
from __future__ import annotations

from pipedec_sim.protocol.messages import Action, Drafted, Inject, Update, Verified
from pipedec_sim.protocol.policies import Candidate, LayerPolicy
from pipedec_sim.protocol.strategies.base import Strategy, row
from pipedec_sim.protocol.tree import Hit, Node, PredictionTree


class PipeDec(Strategy):
    name = "pipedec"

    def __init__(self, prompt, max_new_tokens, *, policy: LayerPolicy | None = None,
                 window: int | None = None, eos=None, pooled: bool = False):
        """window: most batches in flight (injected, not yet back). The harness sets it
        to S + 1 so that a stage slower than stage 1 cannot queue layers without bound
        (prune notices travelling in-band would wait behind the queue).
        pooled: a serving scheduler grows the tree (`growable`, then `grow` with the
        candidates it granted), in one layer with other requests' (SpecPipe-DB); the
        strategy then never injects a layer by itself."""
        super().__init__(prompt, max_new_tokens, eos=eos)
        self.policy = policy or LayerPolicy()
        if window is not None and window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self.pooled = pooled
        self.in_flight: set[int] = set()

    def start(self) -> list[Action]:
        rows = self.prompt_rows()
        root = self.prompt_root()
        root.drafted = True
        self.tree = PredictionTree(root)
        self.entry_free = False
        n = len(rows)
        return [self._send(rows, [root], "prefill", verify_from=n - 1, committed=n),
                self.draft(rows, [root.id], self.policy.topk, committed=n)]

    def on_entry_free(self) -> list[Action]:
        self.entry_free = True
        return self._grow()

    def on_drafted(self, event: Drafted) -> list[Action]:
        nodes = self.tree.nodes
        for i, props in event.proposals.items():
            if i in nodes:                 # proposals for pruned nodes are stale
                nodes[i].proposals = props
        return self._grow()

    def _grow(self) -> list[Action]:
        """Inject the next layer once stage 1 can take it and the frontier is drafted."""
        if self.pooled or not self.entry_free:
            return []
        if self.window is not None and len(self.in_flight) >= self.window:
            return []
        frontier = self.growable()
        return self.grow(self.policy.select(frontier)) if frontier else []

    def growable(self) -> list[Node] | None:
        """The frontier the next layer grows from, once it is drafted (None: not yet, or
        the tree already reaches the request's last position)."""
        frontier = self.tree.frontier()
        if frontier[0].pos >= self.last_pos:
            return None
        for n in frontier:                 # (a loop: cheaper than any() over a generator)
            if n.proposals is None:
                return None
        return frontier

    def grow(self, chosen: list[Candidate]) -> list[Action]:
        """Make the `chosen` candidates the next layer: inject it and draft it."""
        if not chosen:
            return []
        add = self.tree.add
        layer, rows, ids = [], [], []
        for _, p, tok, lp in chosen:       # one loop: this runs for every node
            n = add(p, tok, lp, self.new_id())
            n.drafted = True
            layer.append(n)
            rows.append(row(n))
            ids.append(n.id)
        self.entry_free = False
        return [self._send(rows, layer, "layer"), self.draft(rows, ids, self.policy.topk)]

    def _send(self, rows, nodes, kind: str, **kw) -> Inject:
        """Inject a batch, remembering it in flight and on the nodes it carries."""
        inject = self.inject(rows, kind, **kw)
        batch = inject.batch.id
        self.in_flight.add(batch)
        for n in nodes:
            n.batch = batch
        return inject

    def on_verified(self, event: Verified) -> list[Action]:
        self.in_flight.discard(event.batch)
        root = self.tree.root
        x = event.tokens.get(root.id)
        if x is None:                      # the root was not in this batch (or it died)
            return self._grow()            # a window slot may have opened
        verdict = self.tree.advance(x)
        if isinstance(verdict, Hit):
            # Ideally the new root rode in the batch right behind the old one and leaves
            # the pipeline next. If it was injected later (its branch was crowded out of
            # the layers in flight by likelier siblings and regrew), the hit stalls: the
            # next token waits for the steps in between.
            outcome = "hit" if verdict.root.batch <= root.batch + 1 else "stall"
            actions: list[Action] = [Update(commit=(verdict.root.id,), kill=verdict.killed)]
            actions += self.commit([x], 1, outcome)
            return actions if self.done else actions + self._grow()
        actions = [Update(kill=verdict.killed)] + self.commit([x], 0, "miss")
        if self.done:
            return actions
        new = Node(self.new_id(), root, x, root.pos + 1)
        new.drafted = True
        self.tree.restart(new)
        self.entry_free = False            # the new root jumps the queue at stage 1
        r = row(new)
        return actions + [self._send([r], [new], "token", committed=1),
                          self.draft([r], [new.id], self.policy.topk, committed=1)]
