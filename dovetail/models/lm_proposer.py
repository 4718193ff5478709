"""The draft side: an independent small LM with its own KV cache that proposes token trees.

It learns what the target accepted only as token ids (``propose(new_tokens)``): it finds those
tokens along its previous tree, keeps the KV entries it already computed for them, feeds the rest,
and grows the next tree from the last token (the new root).

Pipelining: while the target verifies the current tree, ``predraft()`` bets on its most likely
outcome (the draft's own greedy path through the tree, all accepted, plus the draft's guess for
the bonus token) and grows the next tree from there. ``settle(new_tokens)`` then keeps that tree
when the bet was right, or rolls the cache back to the longest correct prefix and feeds the rest
(``resolve`` also regrows the tree).

``ModelProposer`` is what the token draft and the feature drafter (``feature_proposer.py``) share:
one interface and the state behind it.

Sampling: for a request that samples (and gave no seed of its own), children are drawn from the
draft's distribution at the request's temperature, top-k and top-p, and the tree carries that
distribution for the rejection rule (``verification.DraftSampler``); otherwise they are its top-k.

Batches: ``propose_together`` grows several requests' trees at once, one draft forward per tree
level for all of them (each proposer keeps its own cache; one with an open bet resolves alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dovetail.models.cached_lm import CachedLM, TreeBlock, extend_together, forward_blocks
from dovetail.models.tree import DraftTree, TreeBuilder, TreeShape, drive, drive_together
from dovetail.models.verification import DraftSampler
from dovetail.sampling import SamplingParams
from dovetail.steps import guessed_right


@dataclass(frozen=True)
class DraftVocab:
    """The draft's token ids it never proposes, because they mean nothing or something else to the
    target: every id from ``limit`` on (past the target's vocabulary, or a padded embedding), and
    ``masked`` (special tokens the two tokenizers name differently). ``agreed``: how many ordinary
    tokens the check found equal, for the start-up report."""

    limit: int | None = None
    masked: tuple[int, ...] = ()
    agreed: int = 0

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.limit is None and not self.masked:
            return logits
        logits = logits.clone()
        if self.limit is not None:
            logits[:, self.limit:] = -float("inf")
        if self.masked:
            logits[:, list(self.masked)] = -float("inf")
        return logits


class ModelProposer:
    """What every draft-model proposer is and keeps, one per request (``local.LocalProposer`` runs
    them; ``DraftProposer`` reads tokens, ``FeatureDraftProposer`` the target's features too):

    * ``start`` a request, then each step ``propose`` (``feed`` the committed tokens, then ``grow``
      the next tree from the last of them) or only ``feed`` them;
    * ``predraft``: bet on the tree under verification and grow the next one from the guess;
      ``settle`` tells the bet's outcome (``steps.guessed_right`` judges it), ``resolve`` gives
      the tree that follows it;
    * ``propose_many``: several requests' ``propose`` or ``feed`` (shape None) at once.

    The state they share: the model (``lm``, its own KV cache), the default tree ``shape``, the
    current tree with its grown node ids (the pending cache entries' keys), the last fed root and
    its logits, and an open bet."""

    reads_features = False

    def __init__(self, lm: CachedLM, shape: TreeShape):
        self.lm = lm
        self.shape = shape
        self._tree: DraftTree | None = None
        self._grown_ids: np.ndarray | None = None
        # the last root: the token fed last (or the current tree's root) and its logits (a bet on a
        # tree cut to its root bets on them)
        self._root: tuple[int, torch.Tensor] | None = None
        self._bet: tuple[int, list[int]] | None = None  # (cache mark, guessed tokens)

    def fresh(self) -> "ModelProposer":
        """A proposer for another request: its own KV cache over the same weights."""
        raise NotImplementedError

    def set_shape(self, shape: TreeShape) -> None:
        """Change the tree budget (takes effect from the next request)."""
        self.shape = shape

    @property
    def betting(self) -> bool:
        """True between ``predraft`` and ``settle`` / ``resolve``."""
        return self._bet is not None

    @property
    def tree(self) -> DraftTree | None:
        """The tree grown last (a held bet's is the next step's)."""
        return self._tree

    def start(self, prompt_ids: list[int], params: SamplingParams | None = None) -> None:
        self._tree = self._grown_ids = self._root = self._bet = None

    def feed(self, new_tokens: list[int], features=None) -> None:
        """Learn the tokens committed since the last call (accepted ones, then the bonus) and grow
        nothing; ``features``: the target's before each of them (a feature drafter's)."""
        raise NotImplementedError

    def grow(self, shape: TreeShape | None = None) -> DraftTree:
        """The next tree (of ``shape``, default the proposer's) from the last token fed."""
        root_token, logits = self._root
        return self._grow(root_token, logits, shape)

    def propose(self, new_tokens: list[int], features=None, shape: TreeShape | None = None) -> DraftTree:
        """``feed``, then ``grow``."""
        self.feed(new_tokens, features)
        return self.grow(shape)

    def predraft(self, shape: TreeShape | None = None) -> tuple[list[int], DraftTree]:
        """Bet on the current tree's outcome and grow the next tree (of ``shape``) from it.
        Returns the guessed committed tokens and the tree; ``settle`` or ``resolve`` must follow."""
        raise NotImplementedError

    def settle(self, new_tokens: list[int], features=None) -> bool:
        """After ``predraft``, what the tree under verification committed: whether the bet held.
        When it held, the bet's tree is ``tree``; when not, the tokens are fed and a tree must be
        grown again."""
        raise NotImplementedError

    def resolve(self, new_tokens: list[int], features=None, shape: TreeShape | None = None) -> tuple[DraftTree, bool]:
        """``settle``, then the tree that follows ``new_tokens`` (the bet's when it held) and whether it held."""
        held = self.settle(new_tokens, features)
        return (self._tree if held else self.grow(shape)), held

    def _grow(self, root_token: int, root_logits: torch.Tensor, shape: TreeShape | None = None) -> DraftTree:
        raise NotImplementedError


class DraftProposer(ModelProposer):
    """A draft LM that reads tokens only (see the module doc)."""

    def __init__(self, lm: CachedLM, shape: TreeShape, vocab: DraftVocab | None = None):
        super().__init__(lm, shape)
        self.vocab = vocab or DraftVocab()
        self.sampler: DraftSampler | None = None

    def fresh(self) -> "DraftProposer":
        return DraftProposer(self.lm.fresh(), self.shape, self.vocab)

    def start(self, prompt_ids: list[int], params: SamplingParams | None = None) -> None:
        """``params``: the request's sampling; its trees are sampled when ``params.draft_samples``."""
        super().start(prompt_ids, params)
        self.lm.reset()
        self.lm.extend(prompt_ids)
        self.sampler = DraftSampler(params) if params is not None and params.draft_samples else None

    def feed(self, new_tokens: list[int], features=None) -> None:
        """``features`` are for a feature drafter; this draft reads tokens only."""
        logits = self.lm.extend(self._to_feed(new_tokens))[-1:]
        self._tree = self._grown_ids = None
        self._root = (int(new_tokens[-1]), logits)

    def predraft(self, shape: TreeShape | None = None) -> tuple[list[int], DraftTree]:
        mark = self.lm.committed
        path = self._best_path_tokens()
        reused = self._keep_accepted_entries(path)  # keeps at most len(path)-1: the leaf is fed for its logits
        leaf_logits = self.lm.extend(path[reused:])[-1:] if path else self._root[1]  # a tree cut to its root
        bonus = int(self._log_probs(leaf_logits).argmax())
        guess = path + [bonus]
        tree = self._grow(bonus, self.lm.extend([bonus])[-1:], shape)
        self._bet = (mark, guess)
        return guess, tree

    def settle(self, new_tokens: list[int], features=None) -> bool:
        (mark, guess), self._bet = self._bet, None
        if guessed_right(guess, new_tokens):
            return True
        same = next((i for i, (a, b) in enumerate(zip(new_tokens, guess)) if a != b), min(len(new_tokens), len(guess)))
        same = min(same, len(new_tokens) - 1)  # the root (last new token) is fed again for its logits
        self.lm.rollback(mark + same)
        self._tree = self._grown_ids = None
        self.feed(list(new_tokens[same:]))
        return False

    @staticmethod
    def propose_many(proposers: list["DraftProposer"], new_tokens: list[list[int]], features=None,
                     shapes=None) -> list[DraftTree | None]:
        return propose_together(proposers, new_tokens, shapes)

    def _best_path_tokens(self) -> list[int]:
        """The draft's greedy path through its current tree, root excluded, as tokens."""
        return [int(self._tree.tokens[n]) for n in self._tree.greedy_path()]

    def _grow(self, root_token: int, root_logits: torch.Tensor, shape: TreeShape | None = None) -> DraftTree:
        return drive(self._growth(root_token, root_logits, shape),
                     lambda block: forward_blocks([self.lm], [block])[0])

    def _growth(self, root_token: int, root_logits: torch.Tensor, shape: TreeShape | None = None):
        """The next tree (of ``shape``, default the proposer's), as a generator that yields each
        draft forward it needs (a ``TreeBlock``) and is sent its logits; returns the tree. The
        root's logits are already known."""
        base = self.lm.committed - 1  # the root is the last committed entry; its children sit one later
        self._root = (root_token, root_logits)
        steps = TreeBuilder(shape or self.shape, self.sampler).grow(root_token)
        try:
            frontier, tokens, parents = next(steps)
            while True:
                if list(frontier) == [0]:
                    logits = root_logits
                else:
                    logits = yield TreeBlock(tokens, parents, np.asarray(frontier), base)
                frontier, tokens, parents = steps.send(self._log_probs(logits))
        except StopIteration as done:
            self._tree, self._grown_ids = done.value
        return self._tree

    def _to_feed(self, new_tokens: list[int]) -> list[int]:
        """Keep the cache entries of the accepted draft tokens; the committed tokens still to feed
        (at least the last one: its logits start the next tree)."""
        return list(new_tokens[self._keep_accepted_entries(new_tokens):])

    def _keep_accepted_entries(self, new_tokens: list[int]) -> int:
        """Commit the pending KV entries of the accepted draft tokens; return how many were kept."""
        if self._tree is None:
            return 0
        node, path = 0, []
        for token in new_tokens[:-1]:
            match = [c for c in self._tree.children(node) if self._tree.tokens[c] == token]
            if not match:
                break
            node = int(match[0])
            path.append(int(self._grown_ids[node]))
        return self.lm.commit(path)

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return log_probs(self.vocab.mask(logits))


def propose_together(proposers: list[DraftProposer], new_tokens: list[list[int]],
                     shapes: list | None = None) -> list[DraftTree | None]:
    """``propose`` for several requests at once, one draft forward per tree level for all of them
    (their caches side by side, as the target verifies a batch): the weights stream once per level
    instead of once per request and level. Same trees as proposing one after another. ``shapes``:
    each request's tree (default: every proposer's own); a shape of None only feeds that request's
    tokens (no tree: None)."""
    if any(p.betting for p in proposers):
        raise RuntimeError("a proposer with an open bet cannot propose in a batch")
    shapes = shapes if shapes is not None else [p.shape for p in proposers]
    root_logits = extend_together([p.lm for p in proposers], [p._to_feed(t) for p, t in zip(proposers, new_tokens)])
    growing = [i for i, shape in enumerate(shapes) if shape is not None]
    for i in set(range(len(proposers))) - set(growing):
        proposers[i]._tree = proposers[i]._grown_ids = None
        proposers[i]._root = (int(new_tokens[i][-1]), root_logits[i])
    growths = [proposers[i]._growth(int(new_tokens[i][-1]), root_logits[i], shapes[i]) for i in growing]
    trees = drive_together(growths, lambda asked: forward_blocks([proposers[growing[i]].lm for i, _ in asked],
                                                                 [block for _, block in asked]))
    out: list[DraftTree | None] = [None] * len(proposers)
    for i, tree in zip(growing, trees):
        out[i] = tree
    return out


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Draft log-probabilities on the CPU."""
    return torch.log_softmax(logits.float(), dim=-1).cpu()
