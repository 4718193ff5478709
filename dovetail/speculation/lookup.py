"""Proposers without a model: they draft from text already seen, in microseconds, where the loop runs.

* ``NgramProposer`` (prompt lookup): find the last few tokens earlier in the prompt or the output
  and propose what followed them there (a chain, or a tree when they were followed by different
  continuations, the most recent first).
* ``SuffixProposer`` (suffix decoding): a suffix trie of bounded depth over the prompt and the
  request's output, and a ``SuffixCache`` of recent outputs of earlier requests of the same
  engine (bounded in tokens), proposes a tree weighted by how often each continuation followed
  the longest context suffix it holds.

Both implement ``dovetail.decode.Proposer``. Their proposals are functions of the committed
tokens alone (never of the target's random draws), so the verifier treats each node as a point
mass, as it does a model's top-k children: exact for sampling too.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from dovetail.decode import Drafting, Proposal
from dovetail.models.tree import DraftTree, TreeShape, tree_from_continuations


class TextProposer:
    """What both model-free proposers share: a history per request, a tree per ``Drafting``, no bets
    (drafting costs microseconds: there is nothing to hide behind verification)."""

    def __init__(self):
        self.histories: dict[str, list[int]] = {}

    def start(self, request_id: str, prompt_ids: list[int], params=None, tenant: str = "") -> None:
        """``params`` are not used: the proposals are functions of the tokens alone."""
        self.histories[request_id] = []
        self._observe(request_id, [int(t) for t in prompt_ids])

    def propose(self, items: list[Drafting]) -> list[Proposal | Exception]:
        out: list[Proposal | Exception] = []
        for item in items:
            t = time.perf_counter()
            try:
                self._observe(item.request_id, [int(x) for x in item.new_tokens])
                history = self.histories[item.request_id]
                shape = item.shape
                tree = (self._draft(item.request_id, history, shape) if shape is not None
                        else DraftTree([history[-1]], [-1]))
                out.append(Proposal(tree, time.perf_counter() - t))
            except Exception as exc:  # this request's own failure
                out.append(exc)
        return out

    def bet(self, request_id: str, step: int, shape=None) -> None:
        raise RuntimeError(f"{type(self).__name__} does not bet")

    def collect_bet(self, request_id: str, step: int, outcome: Drafting) -> Proposal:
        raise RuntimeError(f"{type(self).__name__} does not bet")

    def end(self, request_id: str) -> None:
        self.histories.pop(request_id, None)

    def _observe(self, request_id: str, tokens: list[int]) -> None:
        self.histories[request_id].extend(tokens)

    def _draft(self, request_id: str, history: list[int], shape: TreeShape) -> DraftTree:
        raise NotImplementedError


class NgramProposer(TextProposer):
    """Prompt lookup: the longest of the last ``max_n``..``min_n`` tokens that occurred before, and
    what followed its most recent occurrences (up to ``shape.top_k`` different ones)."""

    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4):
        super().__init__()
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram needs 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.indexes: dict[str, dict[tuple[int, ...], list[int]]] = {}

    def start(self, request_id: str, prompt_ids: list[int], params=None, tenant: str = "") -> None:
        self.indexes[request_id] = {}
        super().start(request_id, prompt_ids, params, tenant)

    def end(self, request_id: str) -> None:
        self.indexes.pop(request_id, None)
        super().end(request_id)

    def _observe(self, request_id: str, tokens: list[int]) -> None:
        """Index every n-gram that ends at a new token by the position that follows it."""
        history, index = self.histories[request_id], self.indexes[request_id]
        for token in tokens:
            history.append(token)
            end = len(history)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                index.setdefault(tuple(history[end - n:end]), []).append(end)

    def _draft(self, request_id: str, history: list[int], shape: TreeShape) -> DraftTree:
        index, end = self.indexes[request_id], len(history)
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            follows = [p for p in index.get(tuple(history[end - n:]), ()) if p < end]
            if follows:
                break
        else:
            return DraftTree([history[-1]], [-1])
        continuations, seen = [], set()
        for p in reversed(follows):  # the most recent first
            cont = tuple(history[p:p + shape.depth])
            if cont and cont not in seen:
                seen.add(cont)
                continuations.append(cont)
            if len(continuations) >= shape.top_k:
                break
        weight = 1.0 / len(continuations)

        def expand(path):
            nxt: dict[int, float] = {}
            for rank, cont in enumerate(continuations):
                if len(cont) > len(path) and cont[:len(path)] == tuple(path):
                    nxt[cont[len(path)]] = nxt.get(cont[len(path)], 0.0) + weight * (1 - 1e-3 * rank)
            total = sum(nxt.values())
            return [(t, w / total) for t, w in nxt.items()]

        return tree_from_continuations(history[-1], expand, shape)


class SuffixTrie:
    """Occurrence counts of every substring of up to ``depth`` tokens of the sequences fed to it.
    ``feed`` continues the current sequence in O(depth) per token (it keeps the nodes of the
    suffixes that end at its last token); ``remove`` undoes a whole sequence's ``add``.

    Nodes are integers (the root is 0) and live in dicts of integers alone: the children of each
    node (token -> node) and every node's count. CPython's garbage collector does not track such
    dicts, so a server's cache of recent outputs (millions of nodes) adds nothing to a full
    collection's walk; as nested lists and dicts it grew every collection by seconds."""

    ROOT = 0

    def __init__(self, depth: int):
        if depth < 2:
            raise ValueError(f"a suffix trie needs depth >= 2, got {depth}")
        self.depth = depth
        self.kids: dict[int, dict[int, int]] = {self.ROOT: {}}  # node -> {token: child}
        self.counts: dict[int, int] = {self.ROOT: 0}
        self._next = 1
        self._open: list[int] = []  # nodes of the suffixes (1 .. depth-1 tokens) ending at the last token

    def feed(self, tokens: list[int]) -> None:
        kids, counts = self.kids, self.counts
        for token in tokens:
            grown = []
            for node in [self.ROOT] + self._open:
                child = kids[node].get(token)
                if child is None:
                    child = kids[node][token] = self._next
                    kids[child], counts[child] = {}, 0
                    self._next += 1
                counts[child] += 1
                grown.append(child)
            self._open = grown[:self.depth - 1]

    def add(self, tokens: list[int]) -> None:
        """Count a sequence of its own (not a continuation of the last one)."""
        self._open = []
        self.feed(tokens)
        self._open = []

    def remove(self, tokens: list[int]) -> None:
        for start in range(len(tokens)):
            node = self.ROOT
            for token in tokens[start:start + self.depth]:
                child = self.kids[node][token]
                self.counts[child] -= 1
                if self.counts[child] <= 0:  # its last occurrence: gone with everything below it
                    del self.kids[node][token]
                    self._drop(child)
                    break
                node = child

    def _drop(self, node: int) -> None:
        below = [node]
        while below:
            gone = below.pop()
            below.extend(self.kids.pop(gone).values())
            del self.counts[gone]

    def match(self, context: list[int], longest: int) -> tuple[int | None, int]:
        """The node of the longest suffix of ``context`` (at most ``longest`` tokens) that was
        followed by something, and its length; (None, 0) when none was."""
        for m in range(min(longest, len(context), self.depth - 1), 0, -1):
            node = self.ROOT
            for token in context[len(context) - m:]:
                node = self.kids[node].get(token)
                if node is None:
                    break
            else:
                if self.kids[node]:
                    return node, m
        return None, 0

    def continuations(self, node: int):
        """``expand`` for ``tree_from_continuations`` below ``node``: children by frequency."""

        def expand(path):
            here = node
            for token in path:
                here = self.kids[here].get(token)
                if here is None:
                    return []
            total = sum(self.counts[child] for child in self.kids[here].values())
            return [(t, self.counts[child] / total) for t, child in self.kids[here].items()] if total else []

        return expand

    def as_nested(self, node: int = ROOT) -> list:
        """The trie below ``node`` as nested ``[count, {token: ...}]`` (tests, debugging)."""
        return [self.counts[node], {t: self.as_nested(child) for t, child in self.kids[node].items()}]


class SuffixCache:
    """Recent outputs of finished requests of one engine (one deployment), at most ``max_tokens``
    of them, oldest dropped first, as a ``SuffixTrie``. Keyed by tenant: requests see only the
    outputs of their own tenant (``Request.tenant``), never another's."""

    def __init__(self, depth: int = 24, max_tokens: int = 200_000):
        self.depth, self.max_tokens = depth, max_tokens
        self.tries: dict[str, SuffixTrie] = {}
        self.kept: deque[tuple[str, list[int]]] = deque()
        self.tokens = 0
        self.lock = threading.Lock()

    def add(self, tenant: str, tokens: list[int]) -> None:
        tokens = list(tokens[-self.max_tokens:])
        if not tokens:
            return
        with self.lock:
            self.tries.setdefault(tenant, SuffixTrie(self.depth)).add(tokens)
            self.kept.append((tenant, tokens))
            self.tokens += len(tokens)
            while self.tokens > self.max_tokens:
                old_tenant, old = self.kept.popleft()
                self.tries[old_tenant].remove(old)
                self.tokens -= len(old)

    def match(self, tenant: str, context: list[int], longest: int):
        """As ``SuffixTrie.match`` in the tenant's trie, with that trie: (trie, node, length)."""
        trie = self.tries.get(tenant)
        return (None, None, 0) if trie is None else (trie, *trie.match(context, longest))


class SuffixProposer(TextProposer):
    """Suffix decoding: the request's own trie (prompt + output) and the engine's ``SuffixCache``;
    the longer match wins. The tree is grown best-first by continuation frequency; a path is
    proposed while its estimated probability is at least ``min_prob``."""

    name = "suffix"

    def __init__(self, cache: SuffixCache | None = None, depth: int = 24, longest_match: int = 16,
                 min_prob: float = 0.1):
        super().__init__()
        self.cache = cache if cache is not None else SuffixCache(depth)
        self.depth, self.longest_match, self.min_prob = depth, longest_match, min_prob
        self.tries: dict[str, SuffixTrie] = {}
        self.tenants: dict[str, str] = {}
        self.outputs_from: dict[str, int] = {}

    def start(self, request_id: str, prompt_ids: list[int], params=None, tenant: str = "") -> None:
        self.tries[request_id] = SuffixTrie(self.depth)
        self.tenants[request_id] = tenant
        self.outputs_from[request_id] = len(prompt_ids)
        super().start(request_id, prompt_ids, params, tenant)

    def end(self, request_id: str) -> None:
        history = self.histories.get(request_id)
        if history is not None:  # its output joins the cache for later requests of its tenant
            self.cache.add(self.tenants[request_id], history[self.outputs_from[request_id]:])
        for table in (self.tries, self.tenants, self.outputs_from):
            table.pop(request_id, None)
        super().end(request_id)

    def _observe(self, request_id: str, tokens: list[int]) -> None:
        super()._observe(request_id, tokens)
        self.tries[request_id].feed(tokens)

    def _draft(self, request_id: str, history: list[int], shape: TreeShape) -> DraftTree:
        own_trie = self.tries[request_id]
        own, own_len = own_trie.match(history, self.longest_match)
        shared_trie, shared, shared_len = self.cache.match(self.tenants[request_id], history, self.longest_match)
        trie, node = (own_trie, own) if own_len >= shared_len else (shared_trie, shared)
        if node is None:
            return DraftTree([history[-1]], [-1])
        return tree_from_continuations(history[-1], trie.continuations(node), shape, self.min_prob)
