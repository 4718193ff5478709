"""A cut draft head: the draft model proposes only from the N tokens most frequent in text.

A draft level reads every weight of the draft once, and its LM head is the largest of them (the
packaged 0.5B's is 151,936 x 896 in Q8_0, 145 MB, about a third of a level's bytes), though most
of those tokens are never proposed. ``CutHead`` keeps the head's rows of N tokens only, in the
file's own blocks: the matmul reads N rows, and the logits of every other token are -inf, so the
draft's distribution q is renormalised over the N tokens. That is lossless by construction: q is
the distribution the draft proposed from, and verification's rejection rule takes any q (a
token outside the cut is simply never proposed, and when the target picks one the step ends
with it, as with any rejection).

Which N tokens: counted in text the project ships or makes (``count_tokens``): the target's own
answers where Dovetail ships them (``training/corpora``), and Python's standard library source,
through the draft's tokenizer; the ids the text never shows are ranked by id (a BPE vocabulary
is numbered in merge order, so lower ids are the more frequent pieces); the model's EOS ids are
always kept. The cut is kept beside the model (``draft-head-<N>-<sources>.json``), with the text
it came from and how many tokens of it were counted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

# N when the draft's head is cut by default ("auto"): chosen by measurement of draft cost
# against acceptance (docs/benchmarks.md, "A cut draft head"). A vocabulary at most twice this
# is kept whole: the bytes saved would not pay for the tokens lost.
DEFAULT_CUT = 32768
CODE_TOKENS = 400_000  # of Python's standard library, counted once per cut file


class CutHead(nn.Module):
    """The LM head over ``ids`` only: logits [..., vocab] with -inf outside ``ids``."""

    def __init__(self, kept: nn.Module, ids: np.ndarray, vocab: int):
        super().__init__()
        self.kept = kept  # the head's rows of ``ids``, in order (a QuantLinear)
        self.register_buffer("ids", torch.as_tensor(np.asarray(ids, dtype=np.int64)), persistent=False)
        self.vocab = vocab
        self.out_features = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.kept(x)
        out = torch.full((*kept.shape[:-1], self.vocab), -float("inf"), dtype=kept.dtype)
        out.index_copy_(-1, self.ids, kept)
        return out

    @property
    def nbytes(self) -> int:
        return self.kept.nbytes

    def extra_repr(self) -> str:
        return f"{len(self.ids)} of {self.vocab} tokens"


def count_tokens(tokenizer, vocab: int, target_name: str = "") -> tuple[np.ndarray, dict]:
    """Token counts [vocab] in the text Dovetail ships for ``target_name`` (its answers) and in
    Python's standard library, and where they came from (source -> tokens counted)."""
    from dovetail.training.corpus import stdlib_files

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
    from dovetail.training.answers import PACKAGED

    return sorted(PACKAGED.glob(f"{target_name}/*.jsonl")) if target_name else []


def choose_ids(counts: np.ndarray, n: int, always=()) -> np.ndarray:
    """``always``, then the most counted ids, then the lowest uncounted ids: ``n`` in all, sorted."""
    counted = np.flatnonzero(counts > 0)
    counted = counted[np.argsort(-counts[counted], kind="stable")]
    rest = np.flatnonzero(counts == 0)
    order = np.concatenate([np.asarray(list(always), dtype=np.int64), counted, rest])
    _, first = np.unique(order, return_index=True)
    return np.sort(order[np.sort(first)][:n])


def cut_file(folder: str | Path, n: int, sources: str) -> Path:
    tag = hashlib.sha256(sources.encode()).hexdigest()[:10]
    return Path(folder) / f"draft-head-{n}-{tag}.json"


def ensure_cut(folder: str | Path, tokenizer, vocab: int, n: int, eos_ids, target_name: str = "",
               say=None) -> Path:
    """The cut of ``n`` tokens for the draft in ``folder`` (made once, then read from there)."""
    answers = shipped_answers(target_name)
    key = f"answers:{target_name}:{','.join(p.name for p in answers)};stdlib:{CODE_TOKENS}"
    path = cut_file(folder, n, key)
    if path.exists():
        return path
    if say:
        say(f"counting tokens for the draft's cut head ({n:,} tokens; once, kept in {path.parent})")
    counts, sources = count_tokens(tokenizer, vocab, target_name if answers else "")
    ids = choose_ids(counts, n, [int(e) for e in eos_ids if 0 <= int(e) < vocab])
    record = {"tokens": n, "vocab": vocab, "sources": sources,
              "fill": "ids the text never shows, lowest first (a BPE vocabulary's merge order)",
              "covered": round(float(counts[ids].sum() / max(counts.sum(), 1)), 5), "ids": ids.tolist()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return path


def read_cut(path: str | Path) -> np.ndarray:
    return np.asarray(json.loads(Path(path).read_text())["ids"], dtype=np.int64)
