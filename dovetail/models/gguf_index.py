"""The tensor index of a GGUF file, read fast: ``gguf.GGUFReader`` builds a numpy view of every
metadata value, and a Qwen file's 151,936-entry tokenizer arrays make that 9-18 s of start-up.
This reads only the header, skips the metadata (keeping scalars and strings), and memory-maps the
tensor data. The format constants still come from the ``gguf`` package."""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from dovetail.errors import UserError

_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # the tensor's bytes (uint8) or values (float types), memory-mapped
    offset: int = 0  # of the data in the file

    @property
    def n_bytes(self) -> int:
        return self.data.nbytes


class GGUFIndex:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self._mm)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        self.pos = 24
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string(buf)
            (vtype,) = struct.unpack_from("<I", buf, self.pos)
            self.pos += 4
            value = self._value(buf, GGUFValueType(vtype))
            if value is not None:
                self.metadata[key] = value
        infos = []
        for _ in range(n_tensors):
            name = self._string(buf)
            (n_dims,) = struct.unpack_from("<I", buf, self.pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, self.pos + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, self.pos + 4 + 8 * n_dims)
            self.pos += 4 + 8 * n_dims + 12
            infos.append((name, tuple(int(d) for d in dims), GGMLQuantizationType(ttype), offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-self.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ttype, offset in infos:
            count = int(np.prod(dims))
            per, size = GGML_QUANT_SIZES[ttype]
            nbytes = count // per * size
            if start + offset + nbytes > len(self._mm):
                raise ValueError(f"truncated: tensor {name} ends at byte {start + offset + nbytes:,}, "
                                 f"the file has {len(self._mm):,}")
            raw = self._mm[start + offset:start + offset + nbytes]
            if ttype == GGMLQuantizationType.F32:
                raw = raw.view(np.float32)
            elif ttype == GGMLQuantizationType.F16:
                raw = raw.view(np.float16)
            self.tensors[name] = GGUFTensor(name, dims, ttype, raw, start + offset)

    def release(self, tensor: GGUFTensor) -> None:
        """Drop a tensor's file pages from this process's memory once it has been decoded: they
        count as resident while mapped, and a whole model's worth would double the load's peak."""
        page = mmap.PAGESIZE
        start = tensor.offset // page * page
        end = min(len(self._mm), -(-(tensor.offset + tensor.n_bytes) // page) * page)
        raw_map = getattr(self._mm, "_mmap", None)
        if raw_map is not None and end > start and hasattr(raw_map, "madvise"):
            raw_map.madvise(mmap.MADV_DONTNEED, start, end - start)

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def _string(self, buf) -> str:
        (n,) = struct.unpack_from("<Q", buf, self.pos)
        text = bytes(buf[self.pos + 8:self.pos + 8 + n]).decode("utf-8", errors="replace")
        self.pos += 8 + n
        return text

    def _value(self, buf, vtype: GGUFValueType):
        """Read one value; arrays are skipped (None): the engine needs none of them."""
        if vtype == GGUFValueType.STRING:
            return self._string(buf)
        if vtype in _SCALARS:
            (value,) = struct.unpack_from(_SCALARS[vtype], buf, self.pos)
            self.pos += struct.calcsize(_SCALARS[vtype])
            return value
        if vtype == GGUFValueType.ARRAY:
            (etype, count) = struct.unpack_from("<IQ", buf, self.pos)
            self.pos += 12
            etype = GGUFValueType(etype)
            if etype in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[etype])
            elif etype == GGUFValueType.STRING:
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", buf, self.pos)
                    self.pos += 8 + n
            else:
                for _ in range(count):
                    self._value(buf, etype)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


def open_index(path: str | Path) -> GGUFIndex:
    """The index of a GGUF file, parsed once per process while the file stays the same (start-up
    asks for it from the precision check, the memory plan, the label and the loader)."""
    stat = os.stat(path)
    return _index(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _index(path: str, size: int, mtime_ns: int) -> GGUFIndex:
    return GGUFIndex(path)


def check_gguf(path: str | Path) -> GGUFIndex:
    """The index of a whole, self-consistent GGUF model file, or a one-line ``UserError``: not a
    GGUF file, cut short, no architecture, or metadata that contradicts the tensors (the layer
    count, the hidden size)."""
    try:
        index = GGUFIndex(path)
    except (ValueError, struct.error, OSError) as err:  # an unknown type id is a ValueError too
        raise UserError(f"{path}: not a readable GGUF file ({err})") from None
    arch = index.metadata.get("general.architecture")
    if not arch:
        raise UserError(f"{path}: the GGUF metadata names no architecture (general.architecture)")
    layers = {int(name.split(".")[1]) for name in index.tensors if name.startswith("blk.")}
    declared = index.metadata.get(f"{arch}.block_count")
    if declared is not None and layers != set(range(int(declared))):
        raise UserError(f"{path}: the metadata declares {declared} layers ({arch}.block_count) but the file "
                        f"has tensors for {len(layers)}")
    embed, hidden = index.tensors.get("token_embd.weight"), index.metadata.get(f"{arch}.embedding_length")
    if embed is not None and hidden is not None and embed.shape[0] != int(hidden):
        raise UserError(f"{path}: the metadata declares a hidden size of {hidden} ({arch}.embedding_length) "
                        f"but token_embd.weight has rows of {embed.shape[0]}")
    return index
