"""The cost model: what a step costs on this machine and what it is expected to commit.

* ``VerifyCurve``: seconds of one target forward by rows, measured at start-up (``calibrate``)
  and refreshed from every step the loop times, by context-length bucket, so that long prompts
  (attention) and kernel changes move it without any constant in the code.
* ``AcceptanceRates``: per proposer, the chance that a draft token at depth d is accepted once
  depth d-1 was, decayed so that it follows the text; per request, with the proposer's
  engine-wide figure as its prior.
* ``Confidence``: per draft model, how often a node is accepted against the draft's own
  cumulative probability of it, so that each tree can be cut where its nodes stop paying.
* ``expected_tokens``: committed tokens per step for a chain of k such tokens (+ the bonus).

A step's rate is expected tokens / (draft wait + verification); ``pricing.price`` picks the
proposer and depth with the best rate, and "none" (the target alone: 1 token per one-row
forward) is always one of the choices.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

DECAY = 0.95  # weight of the past per observation: about the last 20 steps count
CONTEXT_BUCKET = 512  # context lengths within a bucket share their correction (buckets double)


def context_bucket(context: int) -> int:
    """0 for contexts under 512 tokens, then one bucket per doubling."""
    return 0 if context < CONTEXT_BUCKET else int(math.log2(context / CONTEXT_BUCKET)) + 1


@dataclass
class Ema:
    """An exponentially decayed mean; ``weight`` says how much it has seen."""

    value: float = 0.0
    weight: float = 0.0

    def add(self, x: float, decay: float = DECAY) -> None:
        self.weight = self.weight * decay + 1.0
        self.value += (x - self.value) / self.weight


@dataclass
class VerifyCurve:
    """Seconds of a target forward by rows (a draft's tree level by trees grown together uses the
    same interpolation). ``base``: measured at a short context (rows -> seconds).

    Online, each (context bucket, rows) keeps its own decayed mean. Rows never seen in a bucket pay
    the base curve plus the bucket's *extra* over it, as a line in the rows: attention costs rows
    x context, so at a long context every row adds its share. With two or more row counts seen the
    line runs through them (least squares); with one, all of its extra is taken as per-row, which
    over- rather than under-prices a larger block; a bucket with nothing seen borrows the nearest
    shorter one's line, doubled per bucket (the context doubles)."""

    base: dict[int, float]
    seen: dict[tuple[int, int], Ema] = field(default_factory=dict)

    def __post_init__(self):
        if not self.base or any(r < 1 or s <= 0 for r, s in self.base.items()):
            raise ValueError(f"a verify curve needs positive times for rows >= 1, got {self.base}")
        self._rows = sorted(self.base)

    def base_at(self, rows: int) -> float:
        """Linear between measured rows; beyond the last, the last segment's slope."""
        xs = self._rows
        if rows in self.base:
            return self.base[rows]
        if len(xs) == 1:
            return self.base[xs[0]] * rows / xs[0]
        i = min(max(bisect.bisect_left(xs, rows), 1), len(xs) - 1)
        x0, x1 = xs[i - 1], xs[i]
        y0, y1 = self.base[x0], self.base[x1]
        return max(y0 + (y1 - y0) * (rows - x0) / (x1 - x0), 1e-6)

    def at(self, rows: int, context: int = 0) -> float:
        bucket = context_bucket(context)
        seen = self.seen.get((bucket, rows))
        if seen is not None and seen.weight >= 1.0:
            return seen.value
        return max(self.base_at(rows) + self.extra(rows, bucket), 1e-6)

    def extra(self, rows: int, bucket: int) -> float:
        """The bucket's predicted seconds over the base curve for ``rows`` (see the class doc)."""
        for lower in range(bucket, -1, -1):
            line = self._extra_line(lower)
            if line is not None:
                intercept, slope = line
                return (intercept + slope * rows) * 2 ** (bucket - lower)
        return 0.0

    def _extra_line(self, bucket: int) -> tuple[float, float] | None:
        points = [(r, ema.value - self.base_at(r), ema.weight) for (b, r), ema in self.seen.items()
                  if b == bucket and ema.weight >= 1.0]
        if not points:
            return None
        if len({r for r, _, _ in points}) == 1:
            r, e, _ = points[0]
            return (0.0, e / r) if e > 0 else (e, 0.0)
        total = sum(w for _, _, w in points)
        mean_r = sum(r * w for r, _, w in points) / total
        mean_e = sum(e * w for _, e, w in points) / total
        spread = sum(w * (r - mean_r) ** 2 for r, _, w in points)
        slope = max(sum(w * (r - mean_r) * (e - mean_e) for r, e, w in points) / spread, 0.0)
        return mean_e - slope * mean_r, slope

    def observe(self, rows: int, context: int, seconds: float) -> None:
        if rows < 1 or seconds <= 0:
            return
        self.seen.setdefault((context_bucket(context), rows), Ema()).add(seconds)


class AcceptanceRates:
    """Conditional acceptance by depth (1-based) of one proposer: accepted / reached, decayed,
    starting from ``prior`` with the weight of ``prior_weight`` observations."""

    def __init__(self, max_depth: int, prior: float | list[float] = 0.5, prior_weight: float = 2.0):
        priors = prior if isinstance(prior, list) else [prior] * max_depth
        self.accepted = [p * prior_weight for p in priors]
        self.reached = [prior_weight] * max_depth

    @property
    def max_depth(self) -> int:
        return len(self.reached)

    def rate(self, depth: int) -> float:
        reached = self.reached[depth - 1]
        return self.accepted[depth - 1] / reached if reached > 0 else 0.0

    def rates(self) -> list[float]:
        return [self.rate(d) for d in range(1, self.max_depth + 1)]

    def observe(self, proposed_depth: int, accepted: int) -> None:
        """One step: the tree reached ``proposed_depth``; ``accepted`` draft tokens were accepted.
        Depth d counts as reached when every depth before it was accepted."""
        for d in range(1, min(proposed_depth, accepted + 1, self.max_depth) + 1):
            self.reached[d - 1] = self.reached[d - 1] * DECAY + 1.0
            self.accepted[d - 1] = self.accepted[d - 1] * DECAY + (1.0 if accepted >= d else 0.0)


class Confidence:
    """How often a draft node is accepted (the target commits it) by the draft's cumulative
    probability of it, in buckets of 0.1, decayed; a bucket starts at its midpoint as if seen
    ``prior_weight`` times. ``lowest(worth)`` is where a tree should be cut."""

    BUCKETS = 10
    TOP = 0.9  # nodes at least this likely are always worth trying: the buckets under a cut-off
    # see nothing until a probe, so a cut-off never rises above the top bucket's edge

    def __init__(self, prior_weight: float = 2.0):
        self.accepted = [(b + 0.5) / self.BUCKETS * prior_weight for b in range(self.BUCKETS)]
        self.seen = [prior_weight] * self.BUCKETS

    def _bucket(self, prob: float) -> int:
        return min(max(int(prob * self.BUCKETS), 0), self.BUCKETS - 1)

    def rate(self, prob: float) -> float:
        b = self._bucket(prob)
        return self.accepted[b] / self.seen[b]

    def observe(self, prob: float, accepted: bool) -> None:
        b = self._bucket(prob)
        self.seen[b] = self.seen[b] * DECAY + 1.0
        self.accepted[b] = self.accepted[b] * DECAY + (1.0 if accepted else 0.0)

    def lowest(self, worth: float) -> float:
        """The lowest cumulative probability from which on every bucket is accepted at least
        ``worth`` of the time (a node's cost in tokens at the step's rate): the cut-off."""
        cut = 1.0
        for b in reversed(range(self.BUCKETS)):
            if self.accepted[b] / self.seen[b] < worth:
                break
            cut = b / self.BUCKETS
        return min(cut, self.TOP)


def blended(own: AcceptanceRates, prior: AcceptanceRates, weight: float = 4.0) -> list[float]:
    """A request's rates, its own observations pulled towards the engine-wide ``prior`` as if
    that were ``weight`` observations."""
    out = []
    for d in range(1, own.max_depth + 1):
        p = prior.rate(d)
        out.append((own.accepted[d - 1] + p * weight) / (own.reached[d - 1] + weight))
    return out


def expected_tokens(rates: list[float], depth: int) -> float:
    """Committed tokens per step for a chain of ``depth`` draft tokens with these conditional
    acceptance rates: 1 (the bonus, always) + the chance each position is reached and accepted."""
    total, reach = 1.0, 1.0
    for d in range(depth):
        reach *= rates[d]
        total += reach
    return total
