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
always kept (``training/vocab.py`` counts and chooses them). The cut is kept beside the model
(``draft-head-<N>-<sources>.json``), with the text it came from and how many tokens of it were
counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn


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


def read_cut(path: str | Path) -> np.ndarray:
    return np.asarray(json.loads(Path(path).read_text())["ids"], dtype=np.int64)
