"""Draft token trees: structure, ancestry masks, and EAGLE-2-style growth and pruning.

A tree's node 0 is the *root*: the last committed token, whose KV entry nobody has computed yet.
Every other node is a draft token; ``parents[i] < i`` always (nodes are stored parent-first), so
position ids are ``prefix_length + depth`` and a node may attend to its ancestors and itself.
A chain of k tokens is the tree with ``top_k=1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TreeShape:
    """Tree budget: ``total_tokens`` nodes incl. the root, ``depth`` draft levels, ``top_k`` children
    per expanded node and expanded nodes per level (EAGLE-2's knobs).

    Confidence cut-offs on the draft's cumulative probability of a node (the product along its
    path; 0: off): a node is kept only at ``p_keep`` or more, and expanded (which costs a draft
    forward) only at ``p_grow`` or more. The cost model sets them from what a verified row and a
    draft level cost against what a node of that probability is seen to commit."""

    total_tokens: int = 5
    depth: int = 4
    top_k: int = 1
    p_keep: float = 0.0
    p_grow: float = 0.0

    def __post_init__(self):
        if self.depth < 1 or self.top_k < 1 or self.total_tokens < 2:
            raise ValueError(f"tree needs depth>=1, top_k>=1, total_tokens>=2; got {self}")
        if not (0.0 <= self.p_keep <= 1.0 and 0.0 <= self.p_grow <= 1.0):
            raise ValueError(f"tree cut-offs must be probabilities; got {self}")

    @classmethod
    def chain(cls, length: int) -> "TreeShape":
        return cls(total_tokens=length + 1, depth=length, top_k=1)

    @classmethod
    def parse(cls, text: str) -> "TreeShape":
        """``"16,7,10"`` (total_tokens, depth, top_k) or ``"chain:4"``."""
        if text.startswith("chain:"):
            return cls.chain(int(text.split(":", 1)[1]))
        total, depth, top_k = (int(x) for x in text.split(","))
        return cls(total, depth, top_k)

    def fields(self) -> list[float]:
        """``[total_tokens, depth, top_k, p_keep, p_grow]``: how a shape travels in a message."""
        return [self.total_tokens, self.depth, self.top_k, self.p_keep, self.p_grow]

    @classmethod
    def from_fields(cls, fields: list[float]) -> "TreeShape":
        total, depth, top_k, *cut_offs = fields
        return cls(int(total), int(depth), int(top_k), *(float(p) for p in cut_offs))

    def __str__(self) -> str:
        if self.top_k == 1 and self.total_tokens == self.depth + 1:
            return f"chain:{self.depth}"
        return f"{self.total_tokens},{self.depth},{self.top_k}"


@dataclass
class DraftTree:
    """Tokens and parent links of a draft tree (node 0 = root). Plain arrays: it crosses processes.

    A tree whose children were *sampled* from the draft's distribution q also carries q:
    ``q_tokens[i]`` / ``q_probs[i]`` (sparse, [n, K]) is the distribution node i's children were
    drawn from, without replacement, in their stored order (all-zero row: node i's children are
    not sampled). Verification then accepts by rejection against q (``verification``); without q
    the children count as fixed choices.

    A draft model's tree also carries ``scores``: the draft's cumulative log-probability of each
    node (0 at the root), which the cost model relates to what gets accepted."""

    tokens: np.ndarray  # int64 [n]
    parents: np.ndarray  # int64 [n], parents[0] == -1
    q_tokens: np.ndarray | None = None  # int64 [n, K]
    q_probs: np.ndarray | None = None  # float32 [n, K]
    scores: np.ndarray | None = None  # float32 [n]

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, dtype=np.int64)
        self.parents = np.asarray(self.parents, dtype=np.int64)
        if self.parents[0] != -1 or np.any(self.parents[1:] >= np.arange(1, len(self.parents))):
            raise ValueError("tree must be stored parent-first with parents[0] == -1")
        if (self.q_tokens is None) != (self.q_probs is None):
            raise ValueError("a sampled tree needs both q_tokens and q_probs")
        if self.q_tokens is not None:
            self.q_tokens = np.asarray(self.q_tokens, dtype=np.int64)
            self.q_probs = np.asarray(self.q_probs, dtype=np.float32)
            if self.q_tokens.shape != self.q_probs.shape or self.q_tokens.shape[0] != len(self.tokens):
                raise ValueError(f"q arrays {self.q_tokens.shape} / {self.q_probs.shape} do not fit a tree of "
                                 f"{len(self.tokens)} nodes")
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float32)
            if self.scores.shape != self.tokens.shape:
                raise ValueError(f"scores {self.scores.shape} do not fit a tree of {len(self.tokens)} nodes")

    @property
    def sampled(self) -> bool:
        return self.q_tokens is not None

    def proposal(self, node: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The (tokens, probabilities) node's children were sampled from, or None (fixed choices)."""
        if self.q_tokens is None or not self.q_probs[node].any():
            return None
        return self.q_tokens[node], self.q_probs[node]

    def subset(self, keep: np.ndarray) -> "DraftTree":
        """The nodes ``keep`` (ascending or any order that lists parents first), renumbered in that
        order; every kept node's parent must be kept."""
        keep = np.asarray(keep, dtype=np.int64)
        remap = -np.ones(len(self), dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        parents = self.parents[keep]
        new_parents = np.where(parents >= 0, remap[np.maximum(parents, 0)], -1)
        pick = lambda a: None if a is None else a[keep]  # noqa: E731
        return DraftTree(self.tokens[keep], new_parents, pick(self.q_tokens), pick(self.q_probs), pick(self.scores))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> np.ndarray:
        depth = np.zeros(len(self), dtype=np.int64)
        for i in range(1, len(self)):
            depth[i] = depth[self.parents[i]] + 1
        return depth

    def ancestry(self) -> np.ndarray:
        """Boolean [n, n]: ``A[i, j]`` is True when node j is node i or one of its ancestors."""
        return ancestry_matrix(self.parents)

    def children(self, node: int) -> np.ndarray:
        return np.flatnonzero(self.parents == node)

    def greedy_path(self) -> list[int]:
        """The nodes of the draft's most likely path (first child at each level), root excluded."""
        path, node = [], 0
        while len(children := self.children(node)):
            node = int(children[0])
            path.append(node)
        return path

    def truncated(self, depth: int) -> "DraftTree":
        """The nodes at most ``depth`` levels below the root (parent-first order keeps)."""
        keep = np.flatnonzero(self.depths <= depth)
        return self if len(keep) == len(self) else self.subset(keep)

    def path_to(self, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = int(self.parents[node])
        return path[::-1]


def ancestry_matrix(parents: np.ndarray) -> np.ndarray:
    n = len(parents)
    anc = np.eye(n, dtype=bool)
    for i in range(1, n):
        anc[i] |= anc[parents[i]]
    return anc


class TreeBuilder:
    """Grows a tree level by level from the draft's scores, EAGLE-2 style.

    Each level asks for the draft's log-probabilities of the next token after some nodes (a
    [len(nodes), vocab] array or tensor). Level 0 expands the root; each following level expands
    the ``top_k`` best new nodes by cumulative log-probability; finally the best
    ``total_tokens - 1`` nodes overall (plus the root) are kept. Ties go to shallower, earlier nodes,
    so the kept set always contains every kept node's parent.

    With a ``sampler`` (``verification.DraftSampler``) each expanded node's children are drawn
    from the draft's distribution without replacement instead of taken top-first, and the tree
    carries that distribution; pruning then keeps, of each node's children, only a first run in
    drawing order (what rejection against q needs to stay exact), best-first within that rule.

    The shape's cut-offs apply to the cumulative probability: nodes under ``p_keep`` are dropped
    (with their subtrees), nodes under ``p_grow`` are not expanded, so a level whose nodes are all
    under it is never run.
    """

    def __init__(self, shape: TreeShape, sampler=None):
        self.shape = shape
        self.sampler = sampler

    def build(self, root_token: int, expand) -> tuple[DraftTree, np.ndarray]:
        """``expand(nodes, tokens, parents)`` answers each level (see ``grow``)."""
        return drive(self.grow(root_token), lambda ask: expand(*ask))

    def grow(self, root_token: int):
        """The growth as a generator, so that many trees can grow in lockstep (one batched draft
        forward per level): it yields ``(nodes, tokens, parents)``, the nodes to expand and the tree
        so far (node ids stay stable), and is sent their log-probabilities. It returns the pruned
        tree and, for each kept node, its id during growth (a draft cache keyed by those ids maps
        back through this array)."""
        import torch

        k = self.shape.top_k
        tokens, parents, scores = [root_token], [-1], [0.0]
        proposals: dict[int, tuple] = {}  # expanded node -> (q tokens, q probs), when sampling
        frontier = [0]
        for level in range(self.shape.depth):
            logp = torch.as_tensor((yield frontier, np.array(tokens), np.array(parents)))
            if self.sampler is None:
                increments, cand_tokens = torch.topk(logp, k, dim=-1)
            else:
                increments, cand_tokens, (q_tokens, q_probs) = self.sampler.draw(logp, k)
                proposals.update((node, (q_tokens[j], q_probs[j])) for j, node in enumerate(frontier))
            cand_scores = (torch.tensor([scores[f] for f in frontier])[:, None] + increments).flatten()
            cand_parent = torch.tensor(frontier).repeat_interleave(increments.shape[1])
            first_new = len(tokens)
            tokens += cand_tokens.flatten().tolist()
            parents += cand_parent.tolist()
            scores += cand_scores.tolist()
            if level + 1 < self.shape.depth:
                best = torch.topk(cand_scores, min(k, len(cand_scores)))
                grow_at = math.log(self.shape.p_grow) if self.shape.p_grow > 0 else -math.inf
                frontier = [first_new + int(i) for i, v in sorted(zip(best.indices.tolist(), best.values.tolist()))
                            if v > -math.inf and v >= grow_at]
                if not frontier:
                    break
        return self._prune(np.array(tokens), np.array(parents), np.array(scores), proposals)

    def _prune(self, tokens, parents, scores, proposals) -> tuple[DraftTree, np.ndarray]:
        if self.shape.p_keep > 0:  # under the cut-off: as if never drawn (the root always stays)
            scores = np.where(scores >= math.log(self.shape.p_keep), scores, -np.inf)
            scores[0] = 0.0
        if self.sampler is not None:
            kept = _best_first_runs(parents, scores, self.shape.total_tokens)
        else:
            keep_n = min(self.shape.total_tokens - 1, int(np.isfinite(scores[1:]).sum()))
            order = np.lexsort((np.arange(1, len(tokens)), -scores[1:]))[:keep_n] + 1
            kept = np.zeros(len(tokens), dtype=bool)
            kept[0] = True
            kept[order] = True
            # Close under ancestry (float ties can otherwise orphan a node).
            for i in sorted(np.flatnonzero(kept), reverse=True):
                j = parents[i]
                while j >= 0 and not kept[j]:
                    kept[j] = True
                    j = parents[j]
        index = np.flatnonzero(kept)
        if self.sampler is None:
            return DraftTree(tokens, parents, scores=scores).subset(index), index
        q_tokens = np.zeros((len(tokens), self.sampler.support), dtype=np.int64)
        q_probs = np.zeros((len(tokens), self.sampler.support), dtype=np.float32)
        for node, (ids, probs) in proposals.items():
            q_tokens[node, :len(ids)], q_probs[node, :len(probs)] = ids, probs
        return DraftTree(tokens, parents, q_tokens, q_probs, scores).subset(index), index


def _best_first_runs(parents: np.ndarray, scores: np.ndarray, total: int) -> np.ndarray:
    """The best ``total`` nodes (root included) of a sampled tree such that each node's kept
    children are its first draws (siblings are stored in drawing order): best-first by score, a
    node becoming eligible once its parent and its previous sibling are kept. Nodes with a -inf
    score (drawn beyond q's support) are never kept."""
    import heapq

    children: dict[int, list[int]] = {}
    for node in range(1, len(parents)):
        children.setdefault(int(parents[node]), []).append(node)
    kept = np.zeros(len(parents), dtype=bool)
    kept[0] = True
    heap: list[tuple[float, int, int]] = []  # (-score, node, its rank among its siblings)

    def offer(parent: int, rank: int) -> None:
        siblings = children.get(parent, [])
        if rank < len(siblings) and np.isfinite(scores[siblings[rank]]):
            heapq.heappush(heap, (-float(scores[siblings[rank]]), siblings[rank], rank))

    offer(0, 0)
    count = 1
    while heap and count < total:
        _, node, rank = heapq.heappop(heap)
        kept[node], count = True, count + 1
        offer(int(parents[node]), rank + 1)
        offer(node, 0)
    return kept


def drive(steps, answer):
    """Run a question-yielding generator to its return value, ``answer``-ing each question."""
    try:
        question = next(steps)
        while True:
            question = steps.send(answer(question))
    except StopIteration as done:
        return done.value


def drive_together(all_steps: list, answer_all) -> list:
    """Run several question-yielding generators in lockstep: ``answer_all(questions)`` gets the
    pending question of every unfinished one (as ``[(index, question)]``) and returns their answers
    in that order. Returns the generators' return values."""
    results = [None] * len(all_steps)
    pending = {}
    for i, steps in enumerate(all_steps):
        try:
            pending[i] = next(steps)
        except StopIteration as done:
            results[i] = done.value
    while pending:
        asked = list(pending.items())
        for (i, _), answer in zip(asked, answer_all(asked)):
            try:
                pending[i] = all_steps[i].send(answer)
            except StopIteration as done:
                results[i] = done.value
                del pending[i]
    return results


def merge_trees(trees: list[DraftTree]) -> DraftTree:
    """Several proposers' trees (same root) as one: shared prefixes once, no duplicate siblings.
    Children keep the order they first appear in (the first tree's first), so the first child is
    still its proposer's most likely one; nodes stay parent-first.

    A sampled tree (with q) keeps its q (and any tree its scores) only when it is the only one with draft nodes: merged
    with others its children count as fixed choices, which is exact too (they were drawn without
    looking at the target), only accepted less often."""
    if not trees:
        raise ValueError("merge_trees needs at least one tree")
    root = int(trees[0].tokens[0])
    if any(int(t.tokens[0]) != root for t in trees):
        raise ValueError("trees to merge must share their root token")
    grown = [t for t in trees if len(t) > 1]
    if len(grown) == 1 and (grown[0].sampled or grown[0].scores is not None):  # a draft model's, alone
        return _breadth_first(grown[0])
    tokens, parents = [root], [-1]
    index: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    for tree in trees:
        mapped = np.zeros(len(tree), dtype=np.int64)
        for node in range(1, len(tree)):
            key = (int(mapped[tree.parents[node]]), int(tree.tokens[node]))
            if key not in index:
                index[key] = len(tokens)
                tokens.append(key[1])
                parents.append(key[0])
            mapped[node] = index[key]
    return _breadth_first(DraftTree(tokens, parents))


def _breadth_first(tree: DraftTree) -> DraftTree:
    """The same tree with its nodes renumbered level by level (siblings in their order)."""
    return tree.subset(np.lexsort((np.arange(len(tree)), tree.depths)))


def tree_from_continuations(root_token: int, expand, shape: TreeShape, min_prob: float = 0.0) -> DraftTree:
    """A tree grown best-first from a proposer's own estimates, within ``shape``'s budget.

    ``expand(path)`` gives the likely next tokens after the draft tokens ``path`` (root excluded)
    as ``[(token, probability), ...]``. Nodes are taken in order of their path's probability (the
    product along it) while the path probability stays at or above ``min_prob``, at most
    ``shape.top_k`` children per node, ``shape.depth`` levels and ``shape.total_tokens`` nodes."""
    import heapq

    tokens, parents, paths = [root_token], [-1], [()]
    children = [0]
    heap = []  # (-probability, tie-break, parent node, token)
    counter = 0

    def push(node: int, prob: float) -> None:
        nonlocal counter
        if len(paths[node]) >= shape.depth:
            return
        for token, p in expand(list(paths[node])):
            if prob * p >= min_prob and prob * p > 0:
                heapq.heappush(heap, (-prob * p, counter, node, int(token)))
                counter += 1

    push(0, 1.0)
    while heap and len(tokens) < shape.total_tokens:
        neg, _, parent, token = heapq.heappop(heap)
        if children[parent] >= shape.top_k:
            continue
        children[parent] += 1
        tokens.append(token)
        parents.append(parent)
        paths.append(paths[parent] + (token,))
        children.append(0)
        push(len(tokens) - 1, -neg)
    return DraftTree(tokens, parents)
