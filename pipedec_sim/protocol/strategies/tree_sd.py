"""Tree-based speculative decoding (EAGLE-2 / SpecInfer style): the draft builds a whole
tree, the tree passes all stages in one batch, the longest matching path plus the
target's bonus token commit."""
from __future__ import annotations

import heapq

from pipedec_sim.protocol.messages import Action, Drafted, Update, Verified
from pipedec_sim.protocol.policies import Eagle2Policy, candidates, chain_policy
from pipedec_sim.protocol.strategies.base import Strategy, row, undrafted_path
from pipedec_sim.protocol.tree import Node, PredictionTree, path


class TreeSD(Strategy):
    name = "tree-sd"

    def __init__(self, prompt, max_new_tokens, *, policy: Eagle2Policy | None = None, eos=None):
        super().__init__(prompt, max_new_tokens, eos=eos)
        self.policy = policy or Eagle2Policy()

    def start(self) -> list[Action]:
        rows = self.prompt_rows()
        root = self.prompt_root()
        root.drafted = True
        self.prefix = rows[:-1]            # prompt rows the target has not seen yet
        self._begin_round(root)
        return [self.draft(rows, [root.id], self.policy.topk, committed=len(rows))]

    def _begin_round(self, root: Node) -> None:
        self.tree = PredictionTree(root)
        self.level: list[Node] = [root]    # nodes whose proposals we wait for
        self.pool: list[Node] = []
        self.depth = min(self.policy.depth, self.last_pos - root.pos)
        self.passes = 0                    # draft passes done this round

    # ---- drafting: one pass per level ------------------------------------------------
    def on_drafted(self, event: Drafted) -> list[Action]:
        for node in self.level:
            node.proposals = event.proposals.get(node.id, ())
        new = [self.tree.add(p, tok, lp, self.new_id())
               for _, p, tok, lp in candidates(self.level, self.policy.topk)]
        self.pool.extend(new)
        self.passes += 1
        if new and self.passes < self.depth:
            self.level = heapq.nlargest(self.policy.topk, new, key=lambda n: n.score)
            for n in self.level:
                n.drafted = True
            return [self.draft([row(n) for n in self.level], [n.id for n in self.level],
                               self.policy.topk)]
        return self._verify()

    def _verify(self) -> list[Action]:
        keep = {n.id for n in self.policy.final(self.pool)} if self.depth > 0 else set()
        self.tree.prune_to(keep)
        nodes = sorted(self.tree.nodes.values(), key=lambda n: (n.pos, n.id))
        rows = list(self.prefix) + [row(n) for n in nodes]
        self.prefix = ()
        n_fixed = len(rows) - len(nodes) + 1        # the prefix and the root are committed
        return [self.inject(rows, "tree", verify_from=n_fixed - 1, committed=n_fixed)]

    # ---- verdict -----------------------------------------------------------------
    def on_verified(self, event: Verified) -> list[Action]:
        node = self.tree.root
        while True:
            x = event.tokens[node.id]
            child = node.children.get(x)
            if child is None:
                break
            node = child
        accepted = path(node, self.tree.root)
        kill = tuple(n.id for n in self.pool if n.id not in {a.id for a in accepted})
        actions: list[Action] = [Update(commit=tuple(a.id for a in accepted), kill=kill)]
        actions += self.commit([a.token for a in accepted] + [x], len(accepted), "accept")
        if not self.done:
            bonus = Node(self.new_id(), node, x, node.pos + 1)
            todo = undrafted_path(bonus)
            for n in todo:
                n.drafted = True
            self._begin_round(bonus)
            actions.append(self.draft([row(n) for n in todo], [bonus.id], self.policy.topk,
                                      committed=len(todo)))
        return actions


class ChainSD(TreeSD):
    """Classic draft-model speculation (vLLM's): the draft proposes a chain of `gamma`
    greedy tokens, the chain passes all stages in one batch, the matching prefix plus the
    target's bonus token commit. A tree-SD tree of one child per level."""
    name = "chain-sd"

    def __init__(self, prompt, max_new_tokens, *, gamma: int = 4, eos=None):
        super().__init__(prompt, max_new_tokens, policy=chain_policy(gamma), eos=eos)
