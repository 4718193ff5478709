"""Where a quantized model's tensors come from: a GGUF file's own blocks (``native``), the same
re-encoded to 4 bits (``q4``, kept on disk once made), or a float checkpoint quantized on load
(``int8``/``int4``). Each source hands ``models/quantized.py`` a tensor's rows and columns (a
shard's slice) in integer form (``Decoded``), or dense floats for what stays float."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

from dovetail.errors import UserError
from dovetail.kernels.formats import SCHEMES
from dovetail.kernels.packing import Decoded, decode, encode, precision_format
from dovetail.models.architectures import by_gguf_name
from dovetail.models.gguf_index import open_index
from dovetail.models.precision import FLOAT_TYPES, gguf_file, unsupported_message
from dovetail.models.slices import Span, SliceReader, weight_files

EMBED_NAME = "model.embed_tokens.weight"


class GGUFSource:
    """HF parameter names -> tensors of a GGUF file (memory-mapped; only touched blocks are read)."""

    def __init__(self, path: Path, config):
        import gguf

        index = open_index(path)
        arch = index.architecture
        arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
        self.family = by_gguf_name(arch)
        if arch_id is None or self.family is None:
            raise UserError(f"{path}: GGUF architecture {arch!r} does not run natively")
        self.index = index
        self.names = gguf.TensorNameMap(arch_id, config.num_hidden_layers)
        self.tensors = index.tensors
        self.config = config

    def _tensor(self, name: str):
        key = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
        return self.tensors.get(key) if key else None

    def has(self, name: str) -> bool:
        return self._tensor(name) is not None

    def _row_order(self, name: str, rows: int) -> np.ndarray | None:
        """llama.cpp stores Llama q/k rows interleaved for its RoPE; HF's order is restored here."""
        if not self.family.permuted_qk:
            return None
        m = re.search(r"self_attn\.([qk])_proj\.", name)
        if not m:
            return None
        heads = self.config.num_attention_heads if m.group(1) == "q" else self.config.num_key_value_heads
        head_dim = rows // heads
        half = np.arange(head_dim // 2)
        return (np.arange(heads)[:, None, None] * head_dim + np.arange(2)[None, :, None]
                + 2 * half[None, None, :]).reshape(-1)

    def dense(self, name: str, rows: list[Span] | None = None) -> torch.Tensor:
        t = self._tensor(name)
        data = np.asarray(t.data)
        if t.tensor_type.name == "BF16":  # the index keeps its bytes: widen to the float32 bits
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif t.tensor_type.name not in FLOAT_TYPES:
            import gguf

            data = gguf.quants.dequantize(data, t.tensor_type)
        data = data.reshape([int(s) for s in reversed(t.shape)]) if data.ndim > 1 or len(t.shape) > 1 else data
        order = self._row_order(name, data.shape[0])
        if order is not None:
            data = data[order]
        if rows is not None:
            data = np.concatenate([data[lo:hi] for lo, hi in rows])
        data = np.array(data, dtype=np.float32)
        if self.family.norm_offset and name.endswith("norm.weight"):
            data -= np.float32(self.family.norm_offset)  # HF's parameter (its norm adds the offset back)
        self.index.release(t)
        return torch.from_numpy(data)

    def format_of(self, name: str):
        """The tensor's block format, or None for a float tensor (kept dense); any other format is
        refused: a layer never silently becomes fp32."""
        t = self._tensor(name)
        if t.tensor_type in SCHEMES:
            return t.tensor_type
        if t.tensor_type.name in FLOAT_TYPES:
            return None
        raise UserError(unsupported_message(self.index.path, t.name, t.tensor_type.name))

    def decoded(self, name: str, rows: list[Span] | None, cols: Span | None) -> Decoded:
        t = self._tensor(name)
        raw = np.asarray(t.data).reshape(int(t.shape[1]), -1)
        order = self._row_order(name, len(raw))
        if order is not None:
            raw = raw[order]
        decoded = decode_blocks(raw, t.tensor_type, int(t.shape[0]), rows, cols)
        self.index.release(t)
        return decoded


def decode_blocks(raw: np.ndarray, qtype, n_cols: int, rows: list[Span] | None, cols: Span | None) -> Decoded:
    """Rows ``rows`` and columns ``cols`` of a weight held as GGUF blocks ``raw`` [rows, bytes],
    in integer form. Columns are cut on whole blocks (the caller split on super-block boundaries)."""
    if rows is not None:
        raw = np.concatenate([raw[lo:hi] for lo, hi in rows])
    per, size = GGML_QUANT_SIZES[qtype]
    if cols is not None:
        raw = raw.reshape(len(raw), n_cols // per, size)[:, cols[0] // per:cols[1] // per].reshape(len(raw), -1)
        n_cols = cols[1] - cols[0]
    return decode(np.ascontiguousarray(raw), qtype, len(raw), n_cols)


class FloatSource:
    """A float safetensors checkpoint quantized on load (``int8``/``int4``), slice by slice."""

    def __init__(self, path: Path, precision: str):
        self.files = weight_files(path)
        self.readers: dict[Path, SliceReader] = {}
        self.precision = precision

    def _reader(self, name: str):
        file = self.files[name]
        if file not in self.readers:
            self.readers[file] = SliceReader(file)
        return self.readers[file]

    def has(self, name: str) -> bool:
        return name in self.files

    def dense(self, name: str, rows: list[Span] | None = None) -> torch.Tensor:
        reader = self._reader(name)
        t = reader.read(name) if rows is None else torch.cat([reader.read(name, 0, lo, hi) for lo, hi in rows])
        return t.float()

    def cols_of(self, name: str) -> int:
        return int(self._reader(name).header[name]["shape"][1])

    def format_of(self, name: str):
        return precision_format(self.precision, self.cols_of(name))

    def decoded(self, name: str, rows: list[Span] | None, cols: Span | None) -> Decoded:
        w = self.dense(name, rows)
        if cols is not None:
            w = w[:, cols[0]:cols[1]]
        qtype = self.format_of(name)  # chosen from the full row length, so every shard agrees
        w = w.numpy()
        return decode(encode(w, qtype), qtype, *w.shape)

    def close(self):
        for reader in self.readers.values():
            reader.close()


class Q4Source(GGUFSource):
    """A GGUF's matrices in formats wider than 4 bits (Q5_0, Q6_K, Q8_0, ...) re-encoded at load
    (the ``q4`` precision): dequantized exactly, then rounded to Q4_K (inputs a multiple of 256)
    or Q4_0. For a draft, whose weights move only acceptance, never the output: a level then
    streams fewer bytes. The token embedding, read a row at a time, keeps its own blocks.

    Re-encoding takes seconds (numpy), so each matrix's new blocks are kept on disk the first
    time (``reencoded_cache``: keyed by the file, its size and time, and the encoder's source) and
    read back at every later start."""

    def __init__(self, path: Path, config):
        super().__init__(path, config)
        self.cache = reencoded_cache(path)
        self._announced = False

    def _reencoded_blocks(self, name: str, qtype) -> np.ndarray:
        """The whole matrix ``name`` as ``qtype`` blocks [rows, bytes], from the cache or made now."""
        path = self.cache / f"{name}.{qtype.name}.npy"
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass
        if not self._announced:
            self._announced = True
            print(f"[dovetail] re-encoding {self.index.path.name}'s matrices wider than 4 bits to 4 bits "
                  f"(once; kept in {self.cache})", file=sys.stderr, flush=True)
        blocks = encode(np.ascontiguousarray(self.dense(name).numpy()), qtype)
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            with open(partial, "wb") as f:
                np.save(f, blocks)
            partial.replace(path)  # a concurrent start never reads half a file
        except OSError:  # a read-only cache: re-encode at every start
            pass
        return blocks

    def _reencoded(self, name: str):
        """The 4-bit format ``name`` is re-encoded to, or None where it keeps its own."""
        qtype = super().format_of(name)
        if qtype is None or SCHEMES[qtype].bits <= 4 or name == EMBED_NAME:
            return None
        return precision_format("int4", int(self._tensor(name).shape[0]))

    def format_of(self, name: str):
        return self._reencoded(name) or super().format_of(name)

    def decoded(self, name: str, rows: list[Span] | None, cols: Span | None) -> Decoded:
        qtype = self._reencoded(name)
        if qtype is None:
            return super().decoded(name, rows, cols)
        # blocks lie within a row and encode alone, so cutting the whole matrix's blocks equals
        # encoding the cut (columns: on the 4-bit format's super-blocks, which shard_ranges keeps)
        return decode_blocks(self._reencoded_blocks(name, qtype), qtype, int(self._tensor(name).shape[0]), rows, cols)


def reencoded_cache(gguf_path: Path) -> Path:
    """Where ``Q4Source`` keeps a file's re-encoded matrices: one folder per file version and
    encoder version (a changed file or encoder gets a new folder, never stale blocks)."""
    import hashlib

    from dovetail.kernels import packing
    from dovetail.store import dovetail_home

    stat = Path(gguf_path).stat()
    digest = hashlib.sha256(f"{Path(gguf_path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode()
                            + Path(packing.__file__).read_bytes()).hexdigest()[:16]
    return dovetail_home() / "reencoded" / f"{Path(gguf_path).parent.name}-{Path(gguf_path).stem}-{digest}"


def open_source(path: Path, precision: str, config):
    if precision == "native":
        return GGUFSource(gguf_file(path), config)
    if precision == "q4":
        return Q4Source(gguf_file(path), config)
    return FloatSource(path, precision)
