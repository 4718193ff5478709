"""Dump the target's last-layer features (after the final norm) for the corpus windows.

The dump is a folder of memory-mapped arrays, ``tokens.npy`` (int32 [windows, seq]),
``spans.npy`` (int32 [windows, 2]: each window's trained tokens, see ``corpus.Windows``) and
``features.npy`` (float16 [windows, seq, hidden]; a window's padding after its span stays zero and
is not computed), plus ``dump.json`` recording how many windows are done. Interrupted, it resumes
at the first missing batch; finished, it is reused as is.

With ``check_greedy`` (the target's own greedy answers) the dump also checks each trained token
against the target's argmax at the position before it and records the share that agree: a
verified corpus, whoever generated it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dovetail.training.corpus import Windows


@dataclass
class FeatureDump:
    tokens: np.ndarray  # int32 [windows, seq]
    features: np.ndarray  # float16 [windows, seq, hidden]
    prefix_len: int
    seconds: float
    spans: np.ndarray  # int32 [windows, 2]: trained tokens begin..end-1
    greedy_agreement: float | None = None  # share of trained tokens equal to the target's argmax

    def span_mask(self, windows) -> np.ndarray:
        """bool [len(windows), seq]: the trained tokens of ``windows``."""
        spans = self.spans[windows]
        positions = np.arange(self.tokens.shape[1])
        return (positions >= spans[:, :1]) & (positions < spans[:, 1:])

    def trained_tokens(self, windows=None) -> np.ndarray:
        """The trained token ids (flat) of ``windows`` (default: all)."""
        windows = np.arange(len(self.tokens)) if windows is None else np.asarray(windows)
        return np.asarray(self.tokens[windows])[self.span_mask(windows)]

    def token_counts(self, vocab_size: int = 0, windows=None) -> np.ndarray:
        """How often each target id occurs in the trained positions of ``windows`` (default: all)."""
        return np.bincount(self.trained_tokens(windows), minlength=vocab_size).astype(np.int32)

    @classmethod
    def open(cls, path: str | Path) -> "FeatureDump":
        path = Path(path)
        meta = json.loads((path / "dump.json").read_text())
        if meta["done"] < meta["windows"]:
            raise RuntimeError(f"feature dump {path} is incomplete ({meta['done']}/{meta['windows']} windows)")
        return cls(np.load(path / "tokens.npy", mmap_mode="r"), np.load(path / "features.npy", mmap_mode="r"),
                   meta["prefix_len"], meta["seconds"], np.load(path / "spans.npy"), meta.get("greedy_agreement"))


def dump_features(model, windows: Windows, out: str | Path, batch: int = 4, desc: str = "target features",
                  check_greedy: bool = False) -> FeatureDump:
    """Run the target over ``windows`` in batches; resumable (see module doc)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "dump.json"
    n, seq = len(windows.token_ids), len(windows.token_ids[0])
    hidden = model.config.hidden_size
    ids = np.asarray(windows.token_ids, dtype=np.int32)
    spans = np.asarray(windows.spans, dtype=np.int32).reshape(n, 2)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if meta is None or meta["windows"] != n or meta["seq"] != seq or meta["hidden"] != hidden:
        meta = {"windows": n, "seq": seq, "hidden": hidden, "prefix_len": windows.prefix_len, "done": 0,
                "seconds": 0.0, "checked": 0, "agreed": 0}
        np.lib.format.open_memmap(out / "features.npy", mode="w+", dtype=np.float16, shape=(n, seq, hidden)).flush()
        np.save(out / "tokens.npy", ids)
        np.save(out / "spans.npy", spans)
    elif not (np.array_equal(np.load(out / "tokens.npy"), ids) and np.array_equal(np.load(out / "spans.npy"), spans)):
        raise RuntimeError(f"{out} holds a dump of different windows; remove it or choose another --out")
    features = np.load(out / "features.npy", mmap_mode="r+")
    base = model.model if hasattr(model, "model") else model
    bar = tqdm(total=int(spans[:, 1].sum()), initial=int(spans[:meta["done"], 1].sum()), unit="tok", desc=desc,
               dynamic_ncols=True)
    with torch.inference_mode():
        for start in range(meta["done"], n, batch):
            t0 = time.perf_counter()
            stop = min(start + batch, n)
            width = int(spans[start:stop, 1].max())  # the batch's padding past its longest window is skipped
            batch_ids = torch.from_numpy(ids[start:stop, :width]).long()
            hidden_states = base(input_ids=batch_ids, use_cache=False).last_hidden_state
            features[start:stop, :width] = hidden_states.to(torch.float16).numpy()
            features.flush()
            if check_greedy:
                checked, agreed = _greedy_agreement(model, hidden_states, batch_ids, spans[start:stop])
                meta["checked"], meta["agreed"] = meta["checked"] + checked, meta["agreed"] + agreed
                meta["greedy_agreement"] = meta["agreed"] / max(meta["checked"], 1)
            meta["done"], meta["seconds"] = stop, meta["seconds"] + time.perf_counter() - t0
            _write_json(meta_path, meta)
            bar.update(int(spans[start:stop, 1].sum()))
            if check_greedy:
                bar.set_postfix(greedy=f"{meta['greedy_agreement']:.4f}")
    bar.close()
    del features
    return FeatureDump.open(out)


def _greedy_agreement(model, hidden_states: torch.Tensor, ids: torch.Tensor, spans: np.ndarray) -> tuple[int, int]:
    """(trained tokens, how many equal the target's argmax at the position before them)."""
    head = model.get_output_embeddings()
    checked = agreed = 0
    for row, (begin, end) in enumerate(spans):
        begin = max(int(begin), 1)
        top = head(hidden_states[row, begin - 1:end - 1]).argmax(-1)
        checked += max(int(end) - begin, 0)
        agreed += int((top == ids[row, begin:end]).sum())
    return checked, agreed


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)
