"""The target side: prefill, verify a draft tree in one forward, accept, commit.

Only plain data goes in and out (token ids, tree arrays), so an actor can wrap it unchanged.
For a feature drafter (``lm.keep_hidden``) it also hands out the last-layer features of what it
committed: the prompt's after ``start``, and ``AcceptedPath.features`` (root + accepted path)
after ``verify`` -- one row per committed token, (accepted + 1) x hidden.
"""

from __future__ import annotations

import torch

from dovetail.models.cached_lm import CachedLM, forward_trees
from dovetail.models.tree import DraftTree
from dovetail.models.verification import (AcceptedPath, WarpedRows, accept_greedy, accept_sampling,
                                          sample_token, target_probs)
from dovetail.sampling import SamplingParams


class TargetVerifier:
    def __init__(self, lm: CachedLM):
        self.lm = lm
        self.params = SamplingParams()
        self.seed: int | None = None
        self.prompt_features: torch.Tensor | None = None
        self._prompt_features: list[torch.Tensor] = []  # a chunked prefill's, until its last chunk

    def fresh(self) -> "TargetVerifier":
        """A verifier for another request: its own KV cache over the same weights."""
        return TargetVerifier(self.lm.fresh())

    @property
    def context_length(self) -> int:
        return int(getattr(self.lm.config, "max_position_embeddings", 1 << 30))

    def start(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Prefill the prompt and return the first generated token."""
        return self.prefill(prompt_ids, params)

    def prefill(self, tokens: list[int], params: SamplingParams | None = None, first: bool = True,
                final: bool = True) -> int | None:
        """Prefill the prompt whole, or one chunk of it (``first``: the request starts here, under
        ``params``; ``final``: the prompt is then all in). The first generated token after the
        final chunk, else None. Every row of a forward is computed on its own, so chunks leave the
        cache (and the first token) a whole prefill leaves."""
        if first:
            self.lm.reset()
            self.params = params
            self.seed = None if params.greedy else params.seeded().seed
            self._prompt_features = []
        logits = self.lm.extend(tokens)
        if self.lm.keep_hidden:
            self._prompt_features.append(self.lm.last_hidden)
        if not final:
            return None
        features, self._prompt_features = self._prompt_features, []
        self.prompt_features = (features[0] if len(features) == 1 else torch.cat(features, dim=-2)) if features else None
        if self.params.greedy:
            return int(logits[-1].argmax())
        # the first sampled token's position is the prompt's length
        return sample_token(target_probs(logits[-1:], self.params)[0], self.seed, self.lm.committed)

    def verify(self, tree: DraftTree) -> AcceptedPath:
        """One forward over the whole tree (root = last committed token), accept, commit the path."""
        return self.accept(tree, self.lm.forward_tree(tree.tokens, tree.parents, range(len(tree)), self.lm.committed))

    def accept(self, tree: DraftTree, logits: torch.Tensor) -> AcceptedPath:
        """Accept a path of the tree whose pending entries and ``logits`` a forward left; commit it."""
        if self.params.greedy:
            accepted = accept_greedy(tree, logits)
        else:
            # the root is the last committed token (its entry not computed yet): the first sampled
            # token's position is one past it
            accepted = accept_sampling(tree, WarpedRows(logits, self.params), self.seed, self.lm.committed + 1)
        if self.lm.keep_hidden:
            accepted.features = self.lm.last_hidden[accepted.path]
        self.lm.commit(accepted.path)
        return accepted


def verify_batch(verifiers: list[TargetVerifier], trees: list[DraftTree]) -> list[AcceptedPath | Exception]:
    """Verify several requests' trees (one verifier per request, one model) in one forward.

    Each request's accepted path, or the exception its own acceptance raised: one request's failure
    (say, in its sampling) must not fail the others of the batch."""
    logits = forward_trees([v.lm for v in verifiers], trees)
    results: list[AcceptedPath | Exception] = []
    for v, tree, rows in zip(verifiers, trees, logits):
        try:
            results.append(v.accept(tree, rows))
        except Exception as exc:
            v.lm.commit([])  # drop its pending block: the request is over, its cache stays consistent
            results.append(exc)
    return results
