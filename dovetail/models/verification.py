"""Verification of a draft tree against the target's logits: greedy and lossless sampling.

Greedy: walk from the root, follow the child whose token equals the target's argmax, stop when
none does; the target's argmax at the last accepted node is the bonus token.

Sampling: every proposer picks its children deterministically (a model's top-k, a text
proposer's continuations), so each candidate's proposal distribution is a point mass. The token
at sequence position t is sampled from the target's (warped) distribution there by inverse CDF
with one uniform number that depends on the request's seed and t alone (``position_uniform``);
the walk accepts the child holding that token, else that token is the bonus. Child c is then
accepted with probability p(c), and siblings together with the sum of theirs, exactly as
multi-candidate rejection sampling with point masses; each position emits exactly the target's
distribution. And since a position's token never depends on the tree, a seeded request gives the
same output whatever the speculation chose, speculation off included. Temperature, top-k and
top-p are applied to the target's logits first (in HF's order), so the guarantee covers them.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, replace

import numpy as np
import torch

from dovetail.errors import UserError
from dovetail.models.tree import DraftTree


GREEDY_BELOW = 1e-5  # a temperature under this samples the argmax anyway: decode greedily (as vLLM does)


@dataclass(frozen=True)
class SamplingParams:
    """``temperature < GREEDY_BELOW`` (0 included) is greedy; ``top_k == 0`` and ``top_p == 1``
    disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def seeded(self) -> "SamplingParams":
        """These parameters with a seed: their own, else a fresh one (the one seed policy: OS
        entropy, never torch's global generator, which reseeding would disturb)."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(63))



def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Warp logits [n, V] into sampling probabilities: temperature, then top-k, then top-p.

    The row max is subtracted before dividing, so a small temperature cannot overflow to inf
    (and NaN probabilities); every accepted non-greedy temperature is >= ``GREEDY_BELOW``."""
    logits = logits.float()
    scores = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores.softmax(dim=-1)


@dataclass
class Acceptance:
    """Result of verifying one tree: the accepted root-to-node path and the committed tokens
    (accepted draft tokens followed by the bonus token); for a feature drafter, the target's
    features at the path's nodes (one row per committed token)."""

    path: list[int]
    tokens: list[int]
    features: torch.Tensor | None = None

    @property
    def accepted_draft_tokens(self) -> int:
        return len(self.path) - 1


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> Acceptance:
    best = logits.argmax(dim=-1).tolist()
    path, node = [0], 0
    while True:
        children = tree.children(node)
        match = [c for c in children if tree.tokens[c] == best[node]]
        if not match:
            break
        node = int(match[0])
        path.append(node)
    return Acceptance(path, [int(tree.tokens[n]) for n in path[1:]] + [best[node]])


def accept_sampling(tree: DraftTree, probs: torch.Tensor, seed: int, position: int) -> Acceptance:
    """``probs[n]``: the target's distribution after tree node n; ``position``: the sequence index
    of the token sampled after the root (node n's follows at ``position + depth(n)``)."""
    path, node = [0], 0
    while True:
        token = sample_token(probs[node], seed, position + len(path) - 1)
        match = [c for c in tree.children(node) if tree.tokens[c] == token]
        if not match:
            return Acceptance(path, [int(tree.tokens[n]) for n in path[1:]] + [token])
        node = int(match[0])
        path.append(node)


def position_uniform(seed: int, position: int) -> float:
    """A uniform number in [0, 1) that is a function of (seed, position) alone, independent across
    positions and seeds."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def sample_token(probs: torch.Tensor, seed: int, position: int) -> int:
    """The token at ``position``: inverse CDF of ``probs`` at ``position_uniform(seed, position)``."""
    cdf = probs.double().cumsum(0)
    u = position_uniform(seed, position) * float(cdf[-1])
    index = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True))
    return min(index, len(cdf) - 1)
