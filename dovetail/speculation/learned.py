"""What the cost model learnt, kept on disk beside the cost curves (``calibrate.cache_path``) under
the part of their key it depends on: the target, the draft, their precisions and the machine (not
the engine kind or the threads: ``check`` and a server share it). A fresh process then starts from
what earlier ones saw instead of from optimistic priors it must probe its way out of.

Kept: the engine-wide acceptance by depth for each arm (proposers and width) and temperature
class, and how many request-steps each losing arm waits before it is tried again. A stored figure
counts as at most ``WEIGHT`` observations, so the text in front of the engine soon moves it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FORMAT = 1
MODEL_KEYS = ("target", "target_precision", "draft", "draft_precision")  # of the cost key
WEIGHT = 8.0  # observations a stored acceptance rate counts as, at most
SAVE_EVERY_S = 30.0  # a busy engine writes at most this often (the first request's end always writes)


def learned_path(cost_key: dict | None) -> Path | None:
    """Where an engine with this cost-curve key keeps what it learns (None: nowhere)."""
    if cost_key is None:
        return None
    from dovetail.speculation.calibrate import cache_path

    path = cache_path({k: cost_key.get(k) for k in MODEL_KEYS})
    return path.with_name(path.stem + ".learned.json")


def key_name(arm: tuple, heat: str) -> str:
    """``model/1 @ greedy``: an (arm, temperature class) key as the file writes it."""
    (proposers, width) = arm
    return f"{'+'.join(proposers)}/{width} @ {heat}"


def load(path: Path | None) -> dict:
    """``{"acceptance": {key: {"accepted": [...], "reached": [...]}}, "probe_after": {key: n}}``;
    empty when there is no file or it cannot be read (it is then written again)."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            return {}
        acceptance = {k: {"accepted": [float(x) for x in v["accepted"]], "reached": [float(x) for x in v["reached"]]}
                      for k, v in data.get("acceptance", {}).items()}
        return {"acceptance": acceptance, "probe_after": {k: int(v) for k, v in data.get("probe_after", {}).items()}}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def restored(stored: dict, max_depth: int):
    """An ``AcceptanceRates`` from a stored entry, each depth's weight capped at ``WEIGHT``."""
    from dovetail.speculation.cost import AcceptanceRates

    rates = AcceptanceRates(max_depth, 0.0, 0.0)
    for d, (accepted, reached) in enumerate(zip(stored["accepted"][:max_depth], stored["reached"][:max_depth])):
        scale = min(1.0, WEIGHT / reached) if reached > 0 else 0.0
        rates.accepted[d], rates.reached[d] = accepted * scale, reached * scale
    return rates


class Keeper:
    """Writes an engine's learnt figures to ``path`` now and then (atomically, never raising: a
    read-only disk costs the next process its head start, nothing more)."""

    def __init__(self, path: Path | None):
        self.path, self.last = path, None

    def due(self) -> bool:
        return self.path is not None and (self.last is None or time.monotonic() - self.last >= SAVE_EVERY_S)

    def save(self, acceptance: dict, probe_after: dict) -> None:
        self.last = time.monotonic()
        data = {"format": FORMAT,
                "acceptance": {key_name(*k): {"accepted": [round(x, 4) for x in v.accepted],
                                              "reached": [round(x, 4) for x in v.reached]}
                               for k, v in acceptance.items() if any(v.reached)},
                "probe_after": {key_name(*k): n for k, n in probe_after.items()}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.path)
        except OSError:
            pass


def describe(path: Path | None) -> list[str]:
    """What ``check`` prints: one line per arm and temperature class, acceptance by depth."""
    data = load(path)
    lines = []
    for key, entry in sorted(data.get("acceptance", {}).items()):
        rates = [a / r if r > 0 else 0.0 for a, r in zip(entry["accepted"], entry["reached"])]
        seen = max(entry["reached"], default=0.0)
        after = data.get("probe_after", {}).get(key)
        lines.append(f"{key}: accepted by depth {', '.join(f'{x:.2f}' for x in rates)} "
                     f"(weight {seen:.0f}" + (f"; a losing probe waits {after} steps" if after else "") + ")")
    return lines
