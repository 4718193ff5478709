"""The draft side for a feature drafter (``models/drafter_net.py``): trees from the target's features.

The drafter's cache entry j holds the pair (target feature f_j, token x_{j+1}) and predicts f_{j+1}.
Each call gets the tokens the target committed and the target's features at the positions just
before them -- one feature per token, ``(accepted + 1) x hidden`` per step (the prompt's features
once, after prefill). The drafter drops the tree it drafted last time (its entries were computed
from *predicted* features), feeds the true pairs, and grows the next tree: a node's input is its
parent's predicted feature and its own token, EAGLE style.

Betting (``predraft``/``settle``, as for the token draft): the next tree grows from the guessed
path with the path's *predicted* features standing in for the target's. When the bet holds, the
true (token, feature) pairs replace those entries on the next ``feed``.
"""

from __future__ import annotations

import torch

from dovetail.models.cached_lm import CachedLM
from dovetail.models.lm_proposer import ModelProposer, log_probs
from dovetail.models.tree import DraftTree, TreeBuilder, TreeShape
from dovetail.steps import guessed_right


class FeatureDraftProposer(ModelProposer):
    reads_features = True  # it must see every step's features, so it is told every step

    def __init__(self, lm: CachedLM, shape: TreeShape):
        super().__init__(lm, shape)
        self._unpaired: list[int] = []
        self._predicted: dict = {}  # grown node id -> its predicted feature
        self._redo_mark: int | None = None  # where the entries drafted from predicted features start
        self._redo: list[tuple[list[int], torch.Tensor]] = []  # true (tokens, features) to feed there

    def fresh(self) -> "FeatureDraftProposer":
        return FeatureDraftProposer(self.lm.fresh(), self.shape)

    def start(self, prompt_ids: list[int], params=None) -> None:
        """A new request. Prompt tokens 1.. pair with the prompt's features on the first ``feed``.
        ``params`` are not used: this drafter proposes its top-k (fixed choices) at any temperature."""
        super().start(prompt_ids, params)
        self.lm.reset()
        self._unpaired = list(prompt_ids[1:])
        self._redo_mark, self._redo = None, []

    def feed(self, new_tokens: list[int], features: torch.Tensor = None) -> None:
        """``new_tokens``: tokens committed since the last call; ``features``: the target's features
        at the positions before each of them (the prompt's, on the first call)."""
        features = torch.as_tensor(features)
        tokens = self._unpaired + [int(t) for t in new_tokens]
        self._unpaired = []
        if len(features) > len(tokens) or len(features) < len(new_tokens):
            raise ValueError(f"{len(new_tokens)} new tokens need as many features, got {len(features)}")
        tokens = tokens[len(tokens) - len(features):]  # a long prompt may come with its last features only
        if self._redo_mark is not None:  # held bets drafted from predicted features: feed the true pairs
            self.lm.rollback(self._redo_mark)
            tokens = [t for done, _ in self._redo for t in done] + tokens
            features = torch.cat([f for _, f in self._redo] + [features])
            self._redo_mark, self._redo = None, []
        self.lm.commit([])  # last step's tree was drafted from predicted features: drop it
        self._root = (int(tokens[-1]), self.lm.extend(tokens, features=features))
        self._tree = None

    @staticmethod
    def propose_many(proposers: list["FeatureDraftProposer"], new_tokens: list[list[int]],
                     features: list[torch.Tensor], shapes=None) -> list[DraftTree | None]:
        """One after another: each tree grows from its own request's features (shape None: feed only)."""
        shapes = shapes if shapes is not None else [p.shape for p in proposers]
        out = []
        for p, t, f, shape in zip(proposers, new_tokens, features, shapes):
            out.append(p.propose(t, f, shape) if shape is not None else p.feed(t, f))
        return out

    def predraft(self, shape: TreeShape | None = None) -> tuple[list[int], DraftTree]:
        """Bet that the draft's greedy path through its tree is accepted, plus its guess for the
        bonus token, and grow the next tree from there. The target's features of those tokens are
        not known yet: the path's predicted ones stand in until ``settle`` brings the true ones."""
        mark = self.lm.committed
        if self._tree is None:
            raise RuntimeError("predraft needs a tree to bet on: propose first")
        path = self._tree.greedy_path()
        grown = [int(self._grown_ids[n]) for n in path]
        kept = self.lm.commit(grown[:-1])  # the leaf is fed below, for its logits
        feature = self._predicted[grown[kept - 1]] if kept else self._predicted[0]
        logits = self._root[1]  # stays the root's when the tree was cut to its root
        for n in path[kept:]:
            logits = self.lm.extend([int(self._tree.tokens[n])], features=feature[None])
            feature = self.lm.last_hidden[-1]
        guess = [int(self._tree.tokens[n]) for n in path] + [int(log_probs(logits).argmax())]
        self._bet = (mark, guess)
        return guess, self._grow(guess[-1], self.lm.extend(guess[-1:], features=feature[None]), shape)

    def settle(self, new_tokens: list[int], features: torch.Tensor = None) -> bool:
        """A held bet keeps its tree; its true features are fed with the next ``feed``."""
        (mark, guess), self._bet = self._bet, None
        if guessed_right(guess, new_tokens):
            self._redo_mark = mark if self._redo_mark is None else self._redo_mark
            self._redo.append((list(guess), torch.as_tensor(features).clone()))
            return True
        self.lm.rollback(mark)
        self.feed(new_tokens, features)
        return False

    def _grow(self, root_token: int, root_logits: torch.Tensor, shape: TreeShape | None = None) -> DraftTree:
        """Grow the tree whose root was fed last: a node's input is its parent's predicted feature
        and its own token."""
        self._root = (root_token, root_logits[-1:])
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

        self._tree, self._grown_ids = TreeBuilder(shape or self.shape).build(root_token, expand)
        self._predicted = predicted
        return self._tree
