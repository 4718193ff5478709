"""The drafter's training corpus: the Python standard library's own source, offline everywhere.

Why this corpus: it is on every machine that runs Dovetail (no hub, no download), it is code in
the same language and style as the evaluation set, and it shares nothing with HumanEval (the
held-out evaluation set). Each window is framed the way the engine meets code at run time: the
target's chat template with a user request, then the assistant answer opening a Python block, so
the features come from the target *answering*, not just reading a file. Only the code positions
are trained on.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from dovetail.models.loading import encode_chat

PACKAGED = Path(__file__).resolve().parent / "corpora"  # text shipped with Dovetail, per target: answers-s<seed>.jsonl, chat-s<seed>.jsonl
SKIP_PARTS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
USER_REQUEST = "Write the following Python module."


@dataclass
class Windows:
    """Token windows of one length: framing tokens, then the trained text (code or an answer),
    then padding. ``spans[i] = (begin, end)``: window i's trained tokens are ``begin..end-1``
    (default: ``prefix_len`` framing tokens, no padding)."""

    token_ids: list[list[int]]
    prefix_len: int
    spans: list[tuple[int, int]] | None = None

    def __post_init__(self):
        if self.spans is None:
            self.spans = [(self.prefix_len, len(w)) for w in self.token_ids]

    def trained_tokens(self) -> int:
        return sum(end - begin for begin, end in self.spans)


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts)]
    return sorted(files)


CODE_BLOCK = "```python\n"


def answer_prefix(tokenizer, opening: str = CODE_BLOCK) -> list[int]:
    """The framing of module source: a fixed request and (by default) a code block's opening
    (only the opening for a target without a chat template)."""
    if tokenizer.chat_template:
        return encode_chat(tokenizer, USER_REQUEST, opening)
    return tokenizer.encode(opening) if opening else []


def code_windows(tokenizer, tokens: int, seq_len: int = 256, seed: int = 0, files: list[Path] | None = None,
                 texts: list[str] | None = None, opening: str = CODE_BLOCK) -> Windows:
    """Windows covering about ``tokens`` trained tokens, cut from shuffled files (deterministic for
    a seed) or from ``texts``, each after the framing (``answer_prefix``)."""
    prefix = answer_prefix(tokenizer, opening)
    body = seq_len - len(prefix)
    if body < 16:
        raise ValueError(f"seq_len {seq_len} leaves no room after the {len(prefix)}-token chat framing")
    if texts is None:
        files = list(files if files is not None else stdlib_files())
        random.Random(seed).shuffle(files)
        texts = (f.read_text(encoding="utf-8", errors="replace") for f in files)
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids) - body + 1, body):
            windows.append(prefix + ids[start:start + body])
            if len(windows) * body >= tokens:
                return Windows(windows, len(prefix))
    return Windows(windows, len(prefix))
