"""A request's sampling parameters, checked where they are made.

Plain values with no torch behind them: requests, the CLI and the HTTP edge build them, and every
process that samples (the target's verifier, a draft model) receives them. How they warp logits
and keep sampling lossless is ``dovetail/models/verification.py``.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace

from dovetail.errors import UserError

GREEDY_BELOW = 1e-5  # a temperature under this samples the argmax anyway: decode greedily (as vLLM does)


@dataclass(frozen=True)
class SamplingParams:
    """``temperature < GREEDY_BELOW`` (0 included) is greedy; ``top_k == 0`` and ``top_p == 1``
    disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    seed_drawn: bool = False  # the engine drew the seed (the caller gave none)

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
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
        return self if self.seed is not None else replace(self, seed=secrets.randbits(63), seed_drawn=True)

    @property
    def draft_samples(self) -> bool:
        """Whether a draft model may sample its trees from its own distribution: when the request
        samples and its caller did not give a seed (a given seed promises an output that does not
        depend on speculation; see ``dovetail/models/verification.py``)."""
        return not self.greedy and (self.seed is None or self.seed_drawn)
