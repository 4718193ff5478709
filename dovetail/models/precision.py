"""Which precision a model runs at, read from its folder before anything loads: its GGUF file,
whether the native kernels run that file (and if not, why, in one line), the file's block formats
and resident bytes, and ``auto`` resolved."""

from __future__ import annotations

from pathlib import Path

from dovetail.errors import UserError
from dovetail.kernels.formats import SCHEMES
from dovetail.kernels.packing import packed_bytes
from dovetail.models.architectures import GGUF_NAMES
from dovetail.models.gguf_index import open_index
from dovetail.models.spec import GGUF_NAME, GGUF_PRECISIONS, PRECISIONS


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file of a model folder, if it has one."""
    candidate = Path(path) / GGUF_NAME
    return candidate if candidate.exists() else None


def gguf_formats(path: str | Path) -> list[str]:
    """The block formats of a GGUF model folder's matrices, most bytes first."""
    from collections import Counter

    sizes: Counter = Counter()
    for t in open_index(gguf_file(path)).tensors.values():
        if len(t.shape) > 1:
            sizes[t.tensor_type.name] += int(t.n_bytes)
    return [name for name, _ in sizes.most_common()]


NATIVE_ARCHITECTURES = GGUF_NAMES  # those of ``architectures.py``: their tensors and forward are tested natively
FLOAT_TYPES = ("F32", "F16", "BF16")  # GGUF tensors kept as floats (norms; some files' embeddings)


def native_bytes(gguf: str | Path) -> int:
    """Resident bytes of a GGUF file's tensors once loaded natively: each matrix repacked in the
    tile layout (Q3_K and Q2_K take more than in the file), float tensors as fp32."""
    from math import prod

    total = 0
    for t in open_index(gguf).tensors.values():
        if len(t.shape) > 1 and t.tensor_type in SCHEMES:
            total += packed_bytes(t.tensor_type, prod(t.shape[1:]), t.shape[0])
        else:
            total += 4 * prod(t.shape)
    return total


def native_refusal(path: str | Path) -> str | None:
    """Why a GGUF model folder cannot run natively (its architecture, or the first matrix in a
    format the kernels do not run), or None: one read of the file's index for both."""
    gguf = gguf_file(path)
    index = open_index(gguf)
    if index.architecture not in NATIVE_ARCHITECTURES:
        return (f"{gguf}: architecture {index.architecture!r} does not run natively yet (only "
                f"{', '.join(NATIVE_ARCHITECTURES)}); precision fp32 runs it through transformers")
    meta, arch = index.metadata, index.architecture
    heads = meta.get(f"{arch}.attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length") or (heads and meta.get(f"{arch}.embedding_length", 0) // heads)
    rotary = meta.get(f"{arch}.rope.dimension_count")
    if rotary and head_dim and rotary < head_dim:  # transformers' GGUF reader drops this: it would run wrong
        return (f"{gguf}: the rotary embedding covers {rotary} of each head's {head_dim} dimensions "
                "(a partial rotary, as in Phi-4-mini), which does not run yet")
    for t in index.tensors.values():
        if len(t.shape) > 1 and t.tensor_type not in SCHEMES and t.tensor_type.name not in FLOAT_TYPES:
            return unsupported_message(gguf, t.name, t.tensor_type.name)
    return None


def unsupported_message(gguf: Path, tensor: str, fmt: str) -> str:
    supported = ", ".join(q.name for q in SCHEMES)
    return (f"{gguf}: tensor {tensor} is {fmt}, a block format the native kernels do not run "
            f"(they run {supported}); precision fp32 runs it dequantized")


def resolve_precision(precision: str, path: str | Path, float_default: str, gguf_default: str = "native") -> str:
    """``auto`` -> ``gguf_default`` for a GGUF folder, else ``float_default``; ``native`` and ``q4``
    need a GGUF whose every matrix is in a block format the kernels run (never a silent float layer)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    has_gguf = gguf_file(path) is not None
    if precision == "auto":
        precision = gguf_default if has_gguf else float_default
    if precision in GGUF_PRECISIONS and not has_gguf:
        raise UserError(f"precision '{precision}' needs a GGUF model ({path} has no {GGUF_NAME}); "
                        "use int8, int4 or fp32 for a float checkpoint")
    if precision in GGUF_PRECISIONS and (reason := native_refusal(path)) is not None:
        raise UserError(reason)
    return precision
