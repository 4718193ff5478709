"""The draft side for a feature drafter (``models/drafter_net.py``): trees from the target's features.

The drafter's cache entry j holds the pair (target feature f_j, token x_{j+1}) and predicts f_{j+1}.
Each call gets the tokens the target committed and the target's features at the positions just
before them -- one feature per token, ``(accepted + 1) x hidden`` per step (the prompt's features
once, after prefill). The drafter drops the tree it drafted last time (its entries were computed
from *predicted* features), feeds the true pairs, and grows the next tree: a node's input is its
parent's predicted feature and its own token, EAGLE style.
"""

from __future__ import annotations

import torch

from dovetail.models.cached_lm import CachedLM
from dovetail.models.lm_proposer import log_probs
from dovetail.models.tree import DraftTree, TreeBuilder, TreeShape


class FeatureDraftProposer:
    uses_features = True

    def __init__(self, lm: CachedLM, shape: TreeShape):
        self.lm = lm
        self.set_shape(shape)
        self._unpaired: list[int] = []

    def set_shape(self, shape: TreeShape) -> None:
        self.shape = shape
        self.builder = TreeBuilder(shape)

    def start(self, prompt_ids: list[int]) -> None:
        """A new request. Prompt tokens 1.. pair with the prompt's features on the first ``propose``."""
        self.lm.reset()
        self._unpaired = list(prompt_ids[1:])

    def propose(self, new_tokens: list[int], features: torch.Tensor) -> DraftTree:
        """``new_tokens``: tokens committed since the last call; ``features``: the target's features
        at the positions before each of them (the prompt's, on the first call)."""
        tokens = self._unpaired + [int(t) for t in new_tokens]
        self._unpaired = []
        if len(features) > len(tokens) or len(features) < len(new_tokens):
            raise ValueError(f"{len(new_tokens)} new tokens need as many features, got {len(features)}")
        tokens = tokens[len(tokens) - len(features):]  # a long prompt may come with its last features only
        self.lm.commit([])  # last step's tree was drafted from predicted features: drop it
        root_logits = self.lm.extend(tokens, features=torch.as_tensor(features))
        predicted = {0: self.lm.last_hidden[-1]}  # node -> its predicted feature (input of its children)
        base = self.lm.committed - 1

        def expand(frontier, tree_tokens, parents):
            if list(frontier) == [0]:
                return log_probs(root_logits)
            inputs = torch.stack([predicted[int(parents[node])] for node in frontier])
            logits = self.lm.forward_tree(tree_tokens, parents, frontier, base, features=inputs)
            for i, node in enumerate(frontier):
                predicted[int(node)] = self.lm.last_hidden[i]
            return log_probs(logits)

        tree, _ = self.builder.build(int(tokens[-1]), expand)
        return tree

