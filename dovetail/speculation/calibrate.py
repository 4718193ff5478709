"""The cost model's start: the target's verify time by rows and a draft model's time per tree
level for 1, 2, 4 and 8 trees grown together (a batch's), measured through the loop's own verifier and proposer (in process or through the actors,
the same calls), and cached under ``$DOVETAIL_HOME/costs`` per machine, model, precision and
kernel build, so only the first start of a configuration pays for it (a few seconds)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

from dovetail.decode import Drafting
from dovetail.models.tree import DraftTree, TreeShape
from dovetail.sampling import SamplingParams

ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
DRAFT_BATCHES = (1, 2, 4, 8)
REPEATS = 3
PROMPT = 8  # tokens of the probe request's prompt
FORMAT = 4  # of the cache files (4: every size measured in the same rounds; 3: fastest of the repeats, monotone)


def machine_fingerprint() -> dict:
    """What makes one machine's costs differ from another's: CPU model, flags, count."""
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = hashlib.sha256(line.encode()).hexdigest()[:12]
                break
    except OSError:
        pass
    return {"cpu": model, "flags": flags, "cpus": len(os.sched_getaffinity(0))}


def cache_path(key: dict) -> Path:
    from dovetail.store import dovetail_home

    digest = hashlib.sha256(json.dumps({**key, **machine_fingerprint(), "format": FORMAT},
                                       sort_keys=True, default=str).encode()).hexdigest()[:16]
    return dovetail_home() / "costs" / f"{digest}.json"


def measured_costs(verifier, proposer=None, context_length: int = 1 << 30, key: dict | None = None,
                   say=lambda msg: None) -> dict:
    """``{"verify": {rows: seconds}, "draft_level_s": {trees: seconds per level} | None}``, from
    the cache for ``key`` or measured now (``key=None``: always measured, never cached)."""
    path = cache_path(key) if key is not None else None
    cached = None
    if path is not None and path.exists():
        try:
            data = json.loads(path.read_text())
            draft = data.get("draft_level_s")
            cached = {"verify": {int(r): float(s) for r, s in data["verify"].items()},
                      "draft_level_s": None if draft is None else {int(b): float(s) for b, s in draft.items()}}
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: measure again
    if cached is not None and (proposer is None or cached["draft_level_s"] is not None):
        return cached
    # (a cache without the draft's part: written for the verify curve alone, by auto batching)
    rows = [r for r in ROWS if PROMPT + (REPEATS + 2) * (r + 1) < context_length] or [1]
    what = ([] if cached else [f"the verify cost curve of this machine (rows {rows[0]}..{rows[-1]})"]) + (
        ["the draft's cost per tree level for 1-8 trees"] if proposer is not None else [])
    say(f"measuring {' and '.join(what)}" + (f"; once, cached in {path.parent}" if path else ""))
    t = time.perf_counter()
    verify, draft = measure(verifier, [] if cached else rows, proposer, DRAFT_BATCHES if proposer is not None else ())
    costs = {"verify": cached["verify"] if cached else monotone(verify),
             "draft_level_s": monotone(draft) if proposer is not None else None}
    say(f"cost curve measured in {time.perf_counter() - t:.1f}s: "
        + ", ".join(f"{r} rows {s * 1e3:.1f} ms" for r, s in costs["verify"].items() if r in (1, 4, 16, 32))
        + ("; draft per level: " + ", ".join(f"{b} trees {s * 1e3:.1f} ms" for b, s in costs["draft_level_s"].items())
           if costs["draft_level_s"] else ""))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(costs))
        tmp.replace(path)
    return costs


def monotone(curve: dict[int, float]) -> dict[int, float]:
    """A forward over more rows (or trees) never costs less than over fewer: a point above a larger
    one's was slowed by something else on the machine, and is cut down to it, so one spike cannot
    price speculation off until the per-step refresh catches up."""
    out, low = {}, float("inf")
    for size in sorted(curve, reverse=True):
        low = min(low, curve[size])
        out[size] = low
    return dict(sorted(out.items()))


def _probe_token(i: int) -> int:
    """Ids 2..6: in every vocabulary (what they are does not change what a forward costs)."""
    return i % 5 + 2


def _probe_prompt() -> list[int]:
    return [_probe_token(3 * i) for i in range(PROMPT)]


class _VerifyProbe:
    """A probe request of its own that verifies chains of ``rows`` nodes, one forward a step."""

    def __init__(self, verifier, rows: int):
        self.verifier, self.rows, self.rid = verifier, rows, f"calibrate-{rows}-{os.getpid()}"
        self.last = verifier.start(self.rid, _probe_prompt(), SamplingParams()).tokens[-1]

    def step(self, step: int) -> float:
        chain = DraftTree([self.last] + [_probe_token(step + i) for i in range(self.rows - 1)],
                          list(range(-1, self.rows - 1)))
        self.verifier.submit([(self.rid, step, chain)])
        verdict = self.verifier.collect(self.rid, step)
        self.last = verdict.tokens[-1]
        return verdict.compute_s

    def end(self) -> None:
        self.verifier.end(self.rid)


class _DraftProbe:
    """``trees`` probe requests whose chains of 2 levels the draft grows together: a step's
    seconds are per level."""

    def __init__(self, proposer, trees: int):
        self.proposer, self.last = proposer, _probe_prompt()[-1]
        self.rids = [f"calibrate-draft-{trees}-{i}-{os.getpid()}" for i in range(trees)]
        for rid in self.rids:
            proposer.start(rid, _probe_prompt())

    def step(self, step: int) -> float:
        proposals = self.proposer.propose([Drafting(rid, step, [self.last], None, TreeShape.chain(2))
                                           for rid in self.rids])
        for proposal in proposals:
            if isinstance(proposal, Exception):
                raise proposal
        self.last = _probe_token(self.last + step)
        return sum(p.compute_s for p in proposals) / 2

    def end(self) -> None:
        for rid in self.rids:
            self.proposer.end(rid)


def _fastest_in_rounds(probes: dict) -> dict:
    """Each probe's fastest step over ``REPEATS`` rounds (after one warm-up round), every round
    stepping every probe once. Noise from other processes only ever adds time, and a burst of it
    then slows one round of every size alike instead of all the repeats of one size: the ratios
    the cost model prices with (rows against one row, a draft level against a forward) stay true."""
    best = {name: float("inf") for name in probes}
    for step in range(1, REPEATS + 2):
        for name, probe in probes.items():
            seconds = probe.step(step)
            if step > 1:
                best[name] = min(best[name], seconds)
    return best


def measure(verifier=None, rows=(), proposer=None, trees=()) -> tuple[dict[int, float], dict[int, float]]:
    """The fastest forward over chains of each of ``rows`` nodes and the draft's fastest level
    for each count of ``trees``, measured together in rounds (``_fastest_in_rounds``)."""
    probes = {}
    try:  # every probe request started is ended, even when a later one fails to start
        for r in rows:
            probes[("verify", r)] = _VerifyProbe(verifier, r)
        for t in trees:
            probes[("draft", t)] = _DraftProbe(proposer, t)
        best = _fastest_in_rounds(probes)
    finally:
        for probe in probes.values():
            probe.end()
    return ({r: best[("verify", r)] for r in rows}, {t: best[("draft", t)] for t in trees})
