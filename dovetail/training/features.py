"""Dump the target's last-layer features (after the final norm) for the corpus windows.

The dump is a folder of two memory-mapped arrays, ``tokens.npy`` (int32 [windows, seq]) and
``features.npy`` (float16 [windows, seq, hidden]), plus ``dump.json`` recording how many windows
are done. Interrupted, it resumes at the first missing batch; finished, it is reused as is.
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

    @classmethod
    def open(cls, path: str | Path) -> "FeatureDump":
        path = Path(path)
        meta = json.loads((path / "dump.json").read_text())
        if meta["done"] < meta["windows"]:
            raise RuntimeError(f"feature dump {path} is incomplete ({meta['done']}/{meta['windows']} windows)")
        return cls(np.load(path / "tokens.npy", mmap_mode="r"), np.load(path / "features.npy", mmap_mode="r"),
                   meta["prefix_len"], meta["seconds"])


def dump_features(model, windows: Windows, out: str | Path, batch: int = 4, desc: str = "target features",
                  ) -> FeatureDump:
    """Run the target over ``windows`` in batches; resumable (see module doc)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "dump.json"
    n, seq = len(windows.token_ids), len(windows.token_ids[0])
    hidden = model.config.hidden_size
    ids = np.asarray(windows.token_ids, dtype=np.int32)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if meta is None or meta["windows"] != n or meta["seq"] != seq or meta["hidden"] != hidden:
        meta = {"windows": n, "seq": seq, "hidden": hidden, "prefix_len": windows.prefix_len, "done": 0,
                "seconds": 0.0}
        np.lib.format.open_memmap(out / "features.npy", mode="w+", dtype=np.float16, shape=(n, seq, hidden)).flush()
        np.save(out / "tokens.npy", ids)
    elif not np.array_equal(np.load(out / "tokens.npy"), ids):
        raise RuntimeError(f"{out} holds a dump of different windows; remove it or choose another --out")
    features = np.load(out / "features.npy", mmap_mode="r+")
    base = model.model if hasattr(model, "model") else model
    bar = tqdm(total=n * seq, initial=meta["done"] * seq, unit="tok", desc=desc, dynamic_ncols=True)
    with torch.inference_mode():
        for start in range(meta["done"], n, batch):
            t0 = time.perf_counter()
            stop = min(start + batch, n)
            hidden_states = base(input_ids=torch.from_numpy(ids[start:stop]).long(), use_cache=False).last_hidden_state
            features[start:stop] = hidden_states.to(torch.float16).numpy()
            features.flush()
            meta["done"], meta["seconds"] = stop, meta["seconds"] + time.perf_counter() - t0
            _write_json(meta_path, meta)
            bar.update((stop - start) * seq)
    bar.close()
    del features
    return FeatureDump.open(out)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)
