"""The draft side: an independent small LM with its own KV cache that proposes token trees.

It learns what the target accepted only as token ids (``propose(new_tokens)``): it finds those
tokens along its previous tree, keeps the KV entries it already computed for them, feeds the rest,
and grows the next tree from the last token (the new root).

Pipelining: while the target verifies the current tree, ``predraft()`` bets on its most likely
outcome (the draft's own greedy path through the tree, all accepted, plus the draft's guess for
the bonus token) and grows the next tree from there. ``resolve(new_tokens)`` then keeps that tree
when the bet was right, or rolls the cache back to the longest correct prefix and redrafts.
"""

from __future__ import annotations

import numpy as np
import torch

from dovetail.models.cached_lm import CachedLM
from dovetail.models.tree import DraftTree, TreeBuilder, TreeShape


class DraftProposer:
    uses_features = False

    def __init__(self, lm: CachedLM, shape: TreeShape, vocab_limit: int | None = None):
        self.lm = lm
        self.set_shape(shape)
        # Draft ids at or above vocab_limit do not exist for the target: never propose them.
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < lm.vocab_size else None
        self._tree: DraftTree | None = None
        self._grown_ids: np.ndarray | None = None
        self._bet: tuple[int, list[int], DraftTree] | None = None  # (cache mark, guessed tokens, tree)

    def set_shape(self, shape: TreeShape) -> None:
        """Change the tree budget (takes effect from the next request)."""
        self.shape = shape
        self.builder = TreeBuilder(shape)

    def start(self, prompt_ids: list[int]) -> None:
        self.lm.reset()
        self.lm.extend(prompt_ids)
        self._tree = self._grown_ids = self._bet = None

    def propose(self, new_tokens: list[int]) -> DraftTree:
        """``new_tokens``: every token committed since the last call (accepted ones, then the bonus)."""
        reused = self._keep_accepted_entries(new_tokens)
        return self._grow(int(new_tokens[-1]), self.lm.extend(new_tokens[reused:])[-1:])

    @property
    def betting(self) -> bool:
        """True between ``predraft`` and ``resolve``."""
        return self._bet is not None

    def predraft(self) -> tuple[list[int], DraftTree]:
        """Bet on the current tree's outcome and grow the next tree from it (see module doc).

        Returns the guessed committed tokens and the tree; ``resolve`` must follow."""
        mark = self.lm.committed
        path = self._best_path_tokens()
        reused = self._keep_accepted_entries(path)  # keeps at most len(path)-1: the leaf is fed for its logits
        bonus = int(self._log_probs(self.lm.extend(path[reused:])[-1:]).argmax())
        guess = path + [bonus]
        tree = self._grow(bonus, self.lm.extend([bonus])[-1:])
        self._bet = (mark, guess, tree)
        return guess, tree

    def resolve(self, new_tokens: list[int]) -> tuple[DraftTree, bool]:
        """After ``predraft``: the tree that follows ``new_tokens`` and whether the bet held."""
        mark, guess, tree = self._bet
        self._bet = None
        if list(new_tokens) == guess:
            return tree, True
        same = next((i for i, (a, b) in enumerate(zip(new_tokens, guess)) if a != b), min(len(new_tokens), len(guess)))
        same = min(same, len(new_tokens) - 1)  # the root (last new token) is fed again for its logits
        self.lm.rollback(mark + same)
        self._tree = self._grown_ids = None
        return self.propose(list(new_tokens[same:])), False

    def _best_path_tokens(self) -> list[int]:
        """The draft's greedy path through its current tree (first child = most likely), root excluded."""
        tokens, node = [], 0
        while len(children := self._tree.children(node)):
            node = int(children[0])
            tokens.append(int(self._tree.tokens[node]))
        return tokens

    def _grow(self, root_token: int, root_logits: torch.Tensor) -> DraftTree:
        base = self.lm.committed - 1  # the root is the last committed entry; its children sit one later

        def expand(frontier, tokens, parents):
            if list(frontier) == [0]:
                return self._log_probs(root_logits)
            return self._log_probs(self.lm.forward_tree(tokens, parents, frontier, base))

        self._tree, self._grown_ids = self.builder.build(root_token, expand)
        return self._tree

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
        return log_probs(logits, self.vocab_limit)


def log_probs(logits: torch.Tensor, vocab_limit: int | None = None) -> torch.Tensor:
    """Draft log-probabilities on the CPU; ids at or above ``vocab_limit`` get -inf."""
    if vocab_limit is not None:
        logits = logits.clone()
        logits[:, vocab_limit:] = -float("inf")
    return torch.log_softmax(logits.float(), dim=-1).cpu()
