"""How many requests decode together: ``--max-batch auto`` (the default) picks the number from the
target's measured verify curve and the KV memory; ``--max-batch N`` pins it.

Throughput of B requests decoding one token each is B / verify(B rows): one forward streams the
weights once for the whole batch, and each row adds its own compute. Each request one more also
slows every running stream by verify(B) / verify(B - 1). ``choose`` takes the largest B, up to
``MAX_AUTO_BATCH``, whose step from B - 1 still raises that throughput by ``MIN_GAIN``, and no more
than the KV memory holds requests of ``TYPICAL_REQUEST_TOKENS``.

Both engines resolve it where their verifier is (``resolve``): the in-process engine at load, the
actor engine in its coordinator, right after the cost model's own measurement; the curve comes
from the same cache (``speculation/calibrate.py``: once per machine and configuration), so a
start that has it measures nothing. The driver learns the choice from the coordinator's ``info``
(the server's admission slots follow it); until then only the bound (``bound``) is known.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"
# A request more must raise the batch's throughput by this share: the step also slows every running
# stream, and below ~10% the gain is within what the curve's noise (fastest of 3 forwards, on a
# machine others use) can invent. With a perfectly flat curve the step from B - 1 to B gains
# B / (B - 1), so no batch past 11 ever qualifies at this share: larger batches must come from
# an explicit --max-batch.
MIN_GAIN = 0.10
MAX_AUTO_BATCH = 16  # the hard cap (the calibration measures forwards up to 32 rows)
TYPICAL_REQUEST_TOKENS = 2048  # prompt + answer of the request the KV cap counts (a chat turn with context)


@dataclass(frozen=True)
class BatchChoice:
    """The batch an engine runs and why, in words (the start-up line, ``info``, ``/health``)."""

    size: int
    why: str

    def as_dict(self) -> dict:
        return {"max_batch": self.size, "max_batch_why": self.why}


def kv_cap(budget_bytes: int | None, request_bytes: int) -> int | None:
    """How many requests of ``request_bytes`` of KV cache fit ``budget_bytes`` (None: unknown)."""
    if not budget_bytes or request_bytes <= 0:
        return None
    return max(1, budget_bytes // request_bytes)


def bound(max_batch: int | str, kv: int | None = None) -> int:
    """The largest batch ``max_batch`` can turn out to be (``auto`` is resolved later)."""
    if max_batch != AUTO:
        return int(max_batch)
    return min(MAX_AUTO_BATCH, kv or MAX_AUTO_BATCH)


def throughput_gains(verify: dict[int, float], cap: int = MAX_AUTO_BATCH) -> dict[int, float]:
    """For each B from 2 up to ``cap`` within the measured rows: how much B one-row requests
    raise the throughput of B - 1 (0.25: 25% more tokens per second)."""
    from dovetail.speculation.cost import VerifyCurve

    curve = VerifyCurve(verify)
    top = min(cap, max(verify))
    return {b: (b / curve.base_at(b)) / ((b - 1) / curve.base_at(b - 1)) - 1.0 for b in range(2, top + 1)}


def choose(verify: dict[int, float], kv: int | None = None, cap: int = MAX_AUTO_BATCH,
           min_gain: float = MIN_GAIN) -> BatchChoice:
    """The largest batch whose last request still raises throughput by ``min_gain``, within
    ``cap`` and the ``kv`` cap (requests the KV memory holds; None: no cap)."""
    gains = throughput_gains(verify, cap)
    paying = [b for b, gain in gains.items() if gain >= min_gain]
    size = max(paying, default=1)
    shown = ", ".join(f"{b}: {gain:+.0%}" for b, gain in gains.items() if b <= size + 1)
    why = (f"auto: the largest batch whose last request adds >= {min_gain:.0%} throughput on this machine's "
           f"verify curve (throughput gain by batch {shown or 'none measured'}; cap {cap})")
    if kv is not None and kv < size:
        size = kv
        why += f"; cut to {kv}: the KV memory holds {kv} requests of {TYPICAL_REQUEST_TOKENS} tokens"
    return BatchChoice(size, why)


def resolve(max_batch: int | str, verifier, context_length: int, key: dict | None = None, kv: int | None = None,
            say=lambda msg: None) -> BatchChoice:
    """``max_batch`` as an engine runs it: a number as given, or ``auto`` chosen from the verify
    curve (from the cache for ``key``, else measured now through ``verifier``)."""
    if max_batch != AUTO:
        return BatchChoice(int(max_batch), f"--max-batch {int(max_batch)}")
    from dovetail.speculation.calibrate import measured_costs

    return choose(measured_costs(verifier, None, context_length, key, say)["verify"], kv)
