"""Which tokens a cut draft head keeps (``models/draft_head.py``): counted in text Dovetail ships
or makes, chosen, and kept beside the draft model with the text they came from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dovetail.models.drafter_net import top_ids
from dovetail.models.loading import load_tokenizer
from dovetail.training.corpus import PACKAGED, stdlib_files

CODE_TOKENS = 400_000  # of Python's standard library, counted once per cut file


def count_tokens(tokenizer, vocab: int, target_name: str = "") -> tuple[np.ndarray, dict]:
    """Token counts [vocab] in the text Dovetail ships for ``target_name`` (its answers) and in
    Python's standard library, and where they came from (source -> tokens counted)."""
    counts = np.zeros(vocab, dtype=np.int64)
    sources: dict[str, int] = {}

    def add(ids, source: str) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < vocab)]
        np.add.at(counts, ids, 1)
        sources[source] = sources.get(source, 0) + int(ids.size)

    for path in shipped_answers(target_name):
        source = f"{target_name}'s answers ({path.name})"
        for line in path.read_text().splitlines():
            record = json.loads(line)
            add(tokenizer.encode(record["request"], add_special_tokens=False), source)
            add(record["answer_ids"], source)
    for path in sorted(stdlib_files()):
        if sources.get("Python standard library", 0) >= CODE_TOKENS:
            break
        add(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False),
            "Python standard library")
    return counts, sources


def shipped_answers(target_name: str) -> list[Path]:
    """The target's own answers Dovetail ships (code: ``answers-*``; chat: ``chat-*``)."""
    return sorted(PACKAGED.glob(f"{target_name}/*.jsonl")) if target_name else []


def cut_file(folder: str | Path, n: int, sources: str) -> Path:
    tag = hashlib.sha256(sources.encode()).hexdigest()[:10]
    return Path(folder) / f"draft-head-{n}-{tag}.json"


def ensure_cut(folder: str | Path, vocab: int, n: int, eos_ids, target_name: str = "", say=None) -> Path:
    """The cut of ``n`` tokens for the draft in ``folder`` (made once, with the folder's tokenizer;
    then read from there, so a start with a cut already made loads no tokenizer for it)."""
    answers = shipped_answers(target_name)
    key = f"answers:{target_name}:{','.join(p.name for p in answers)};stdlib:{CODE_TOKENS}"
    path = cut_file(folder, n, key)
    if path.exists():
        return path
    if say:
        say(f"counting tokens for the draft's cut head ({n:,} tokens; once, kept in {path.parent})")
    counts, sources = count_tokens(load_tokenizer(folder), vocab, target_name if answers else "")
    # EOS, then the most counted ids, then the uncounted ones lowest first (a stable sort keeps id order)
    ids = top_ids(counts, n, [int(e) for e in eos_ids if 0 <= int(e) < vocab])
    record = {"tokens": n, "vocab": vocab, "sources": sources,
              "fill": "ids the text never shows, lowest first (a BPE vocabulary's merge order)",
              "covered": round(float(counts[ids].sum() / max(counts.sum(), 1)), 5), "ids": ids.tolist()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return path


