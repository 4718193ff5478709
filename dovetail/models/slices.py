"""Reading slices of safetensors tensors, and which slice of each parameter a tensor-parallel
shard holds (used by the float shards in ``tp.py`` and the quantized ones in ``quantized.py``).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import torch

# the Megatron layout: parameter name pattern -> (dimension to split, which spans a shard holds)
SPLITS = [
    (re.compile(r"\.self_attn\.q_proj\.(weight|bias)$"), 0, "q"),
    (re.compile(r"\.self_attn\.[kv]_proj\.(weight|bias)$"), 0, "kv"),
    (re.compile(r"\.self_attn\.qkv_proj\.(weight|bias)$"), 0, "qkv"),
    (re.compile(r"\.self_attn\.o_proj\.weight$"), 1, "q"),
    (re.compile(r"\.mlp\.(gate|up)_proj\.weight$"), 0, "mlp"),
    (re.compile(r"\.mlp\.gate_up_proj\.weight$"), 0, "gate_up"),
    (re.compile(r"\.mlp\.down_proj\.weight$"), 1, "mlp"),
    (re.compile(r"^lm_head\.weight$"), 0, "vocab"),
    (re.compile(r"^model\.embed_tokens\.weight$"), 0, "vocab"),
]

Span = tuple[int, int]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def shard_spans(config, rank: int, world: int, mlp: Span | None = None) -> dict[str, list[Span]]:
    """Rank ``rank``'s rows (or columns) of each kind of split, as ranges to concatenate: its heads
    of q and of k/v, its part of the MLP (``mlp``, else an even split) and of the vocabulary. A fused
    projection holds one range of each part it fuses: qkv is q | k | v, gate_up is gate | up."""
    d, kv_heads = head_dim(config), getattr(config, "num_key_value_heads", config.num_attention_heads)
    q_rows, kv_rows, inner = config.num_attention_heads * d, kv_heads * d, config.intermediate_size

    def share(total: int) -> Span:
        return rank * total // world, (rank + 1) * total // world

    def shifted(span: Span, by: int) -> Span:
        return span[0] + by, span[1] + by

    q, kv, mlp = share(q_rows), share(kv_rows), mlp or share(inner)
    return {"q": [q], "kv": [kv], "mlp": [mlp], "vocab": [share(config.vocab_size)],
            "qkv": [q, shifted(kv, q_rows), shifted(kv, q_rows + kv_rows)], "gate_up": [mlp, shifted(mlp, inner)]}


def split_of(name: str, spans: dict[str, list[Span]] | None) -> tuple[list[Span] | None, Span | None]:
    """(row ranges, column range) of parameter ``name`` a shard holds (None: all of them)."""
    if spans is None:
        return None, None
    for pattern, dim, kind in SPLITS:
        if pattern.search(name):
            return (spans[kind], None) if dim == 0 else (None, spans[kind][0])
    return None, None


def weight_files(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    return {name: single for name in SliceReader(single).names()}


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SliceReader:
    """Row or column slices of the tensors in one safetensors file, read with ``preadv``.

    safetensors' own loader memory-maps the file, and every page a slice touches then counts
    in this process's resident memory (a column slice touches all of a matrix's pages). Reading
    only the slice's bytes keeps a shard's peak memory at its own share of the model.
    """

    CHUNK_BYTES = 32 << 20  # column slices are cut from row blocks of about this size

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        (size,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        self.header = json.loads(os.pread(self.fd, size, 8))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + size

    def names(self) -> list[str]:
        return list(self.header)

    def read(self, name: str, dim: int | None = None, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """The whole tensor (``dim=None``), rows ``lo:hi`` (``dim=0``) or columns (``dim=1``, 2-D)."""
        info = self.header[name]
        dtype, shape = _DTYPES[info["dtype"]], list(info["shape"])
        start = self.data_start + info["data_offsets"][0]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        if dim is None:
            return self._read_rows(start, dtype, shape)
        if dim == 0:
            return self._read_rows(start + lo * row_bytes, dtype, [hi - lo, *shape[1:]])
        rows, cols = shape
        out = torch.empty(rows, hi - lo, dtype=dtype)
        step = max(1, self.CHUNK_BYTES // row_bytes)
        for r in range(0, rows, step):
            block = self._read_rows(start + r * row_bytes, dtype, [min(step, rows - r), cols])
            out[r:r + len(block)] = block[:, lo:hi]
        return out

    def _read_rows(self, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"unexpected end of safetensors data at byte {offset + done}")
            done += n
        return out

    def close(self) -> None:
        os.close(self.fd)
