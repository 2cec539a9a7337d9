"""The prediction tree: the root is the newest committed token, every other node a guess.

`advance(token)` is the verdict of the target on the root: a *hit* when the token is one
of the root's children (that child becomes the root, its siblings' subtrees die) or a
*miss* (every guess dies; the caller restarts the tree from the target's token).
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter


class Node:
    __slots__ = ("id", "parent", "token", "pos", "logp", "score", "children",
                 "proposals", "drafted", "batch", "__weakref__")

    def __init__(self, id: int, parent: "Node | None", token: int, pos: int,
                 logp: float = 0.0, score: float = 0.0):
        self.id = id
        self.parent = parent
        self.token = token
        self.pos = pos
        self.logp = logp            # draft log-prob of this token given its parent
        self.score = score          # cumulative log-prob from the root (root: 0)
        self.children: dict[int, Node] = {}   # token -> child
        self.proposals: tuple[tuple[int, float], ...] | None = None  # draft's top-k
        self.drafted = False        # the draft model holds this node's KV
        self.batch = -1             # the batch that carried it into the pipeline

    def __repr__(self) -> str:
        return f"Node(id={self.id}, token={self.token}, pos={self.pos}, score={self.score:.3f})"


@dataclass(frozen=True, slots=True)
class Hit:
    root: Node                 # the child that matched: the new root
    killed: tuple[int, ...]    # ids of every node outside the new root's subtree


@dataclass(frozen=True, slots=True)
class Miss:
    killed: tuple[int, ...]    # ids of every node but the old root


class PredictionTree:
    def __init__(self, root: Node):
        self.restart(root)

    def restart(self, root: Node) -> None:
        root.score = 0.0
        self.root = root
        self.nodes: dict[int, Node] = {root.id: root}
        self._levels: dict[int, list[Node]] = {root.pos: [root]}

    # ---- growth ------------------------------------------------------------------
    def add(self, parent: Node, token: int, logp: float, node_id: int) -> Node:
        pos = parent.pos + 1
        node = Node(node_id, parent, token, pos, logp, parent.score + logp)
        parent.children[token] = node
        self.nodes[node_id] = node
        level = self._levels.get(pos)
        if level is None:
            self._levels[pos] = [node]
        else:
            level.append(node)
        return node

    def frontier(self) -> list[Node]:
        """Live nodes of the deepest level: the next layer grows from them."""
        return self._levels[max(self._levels)]

    # ---- verdicts ----------------------------------------------------------------
    def advance(self, token: int) -> Hit | Miss:
        root = self.root
        child = root.children.get(token)
        if child is None:
            killed = tuple([i for i in self.nodes if i != root.id])
            self.nodes = {root.id: root}
            root.children = {}
            self._levels = {root.pos: [root]}
            return Miss(killed)
        # What dies is the root and its other children's subtrees: walk those (usually
        # the smaller part of the tree) and drop them, rather than rebuild the survivors.
        dead: list[Node] = []
        for sibling in root.children.values():
            if sibling is not child:
                dead += subtree(sibling)
        nodes = self.nodes
        del nodes[root.id]
        for n in dead:
            del nodes[n.id]
        self.root = child
        self._drop_levels(child.pos, {n.id for n in dead})
        return Hit(child, tuple([n.id for n in dead]))

    def prune_to(self, keep_ids: set[int]) -> tuple[int, ...]:
        """Drop every node (root excepted) whose id is not in `keep_ids`; return them."""
        killed = tuple([i for i in self.nodes if i not in keep_ids and i != self.root.id])
        for i in killed:
            node = self.nodes.pop(i)
            if node.parent is not None and node.parent.children.get(node.token) is node:
                del node.parent.children[node.token]
        self._rebuild_levels()
        return killed

    def _drop_levels(self, top: int, dead: set[int]) -> None:
        """Keep the levels from `top` down, less the `dead` ids (levels stay in creation
        order, as `_rebuild_levels` sorts them)."""
        levels: dict[int, list[Node]] = {}
        for pos, level in self._levels.items():
            if pos >= top:
                kept = [n for n in level if n.id not in dead] if dead else level
                if kept:
                    levels[pos] = kept
        self._levels = levels

    def _rebuild_levels(self) -> None:
        levels: dict[int, list[Node]] = {}
        for node in self.nodes.values():
            level = levels.get(node.pos)
            if level is None:
                levels[node.pos] = [node]
            else:
                level.append(node)
        for level in levels.values():          # creation order: ties break the same way
            level.sort(key=_ID)
        self._levels = levels


_ID = attrgetter("id")


def subtree(node: Node) -> list[Node]:
    """`node` and its descendants, depth first (a list: cheaper than a generator here)."""
    out: list[Node] = []
    stack = [node]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.children.values())
    return out


def path(node: Node, stop: Node | None = None) -> list[Node]:
    """Nodes from just below `stop` (or the top) down to `node`, oldest first."""
    out: list[Node] = []
    cur: Node | None = node
    while cur is not None and cur is not stop:
        out.append(cur)
        cur = cur.parent
    out.reverse()
    return out
