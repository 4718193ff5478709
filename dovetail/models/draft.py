"""The draft side: an independent small LM with its own KV cache that proposes token trees.

It learns what the target accepted only as token ids (``propose(new_tokens)``): it finds those
tokens along its previous tree, keeps the KV entries it already computed for them, feeds the rest,
and grows the next tree from the last token (the new root).
"""

from __future__ import annotations

import numpy as np
import torch

from dovetail.models.cached_lm import CachedLM
from dovetail.models.tree import DraftTree, TreeBuilder, TreeShape


class DraftProposer:
    def __init__(self, lm: CachedLM, shape: TreeShape, vocab_limit: int | None = None):
        self.lm = lm
        self.set_shape(shape)
        # Draft ids at or above vocab_limit do not exist for the target: never propose them.
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < lm.vocab_size else None
        self._tree: DraftTree | None = None
        self._grown_ids: np.ndarray | None = None

    def set_shape(self, shape: TreeShape) -> None:
        """Change the tree budget (takes effect from the next request)."""
        self.shape = shape
        self.builder = TreeBuilder(shape)

    def start(self, prompt_ids: list[int]) -> None:
        self.lm.reset()
        self.lm.extend(prompt_ids)
        self._tree = self._grown_ids = None

    def propose(self, new_tokens: list[int]) -> DraftTree:
        """``new_tokens``: every token committed since the last call (accepted ones, then the bonus)."""
        reused = self._keep_accepted_entries(new_tokens)
        root_logits = self.lm.extend(new_tokens[reused:])[-1:]
        base = self.lm.committed - 1  # the root is the last committed entry; its children sit one later

        def expand(frontier, tokens, parents):
            if list(frontier) == [0]:
                return self._log_probs(root_logits)
            return self._log_probs(self.lm.forward_tree(tokens, parents, frontier, base))

        self._tree, self._grown_ids = self.builder.build(int(new_tokens[-1]), expand)
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
        if self.vocab_limit is not None:
            logits = logits.clone()
            logits[:, self.vocab_limit:] = -float("inf")
        return torch.log_softmax(logits, dim=-1)
