"""GGUF block formats: decode them into one integer form, repack that into the kernel's tiles,
and encode float weights into them (round-to-nearest, group-wise) for ``int8``/``int4``.

Every supported format is a set of small unsigned (or, for 8-bit, signed) integers ``q`` with
per-group float scales, ``w = S * q + M`` with

    S = D * sc          (D per super-block, sc an integer sub-scale per group, 1 if none)
    M = -z * S          (symmetric formats, zero point z: Q4_0, Q5_0, Q8_0, Q6_K, Q3_K)
    M = -(Dm * mn)      (K-quants with mins: Q4_K, Q5_K, Q2_K)
    M = Dm              (block formats with a float min: Q4_1, Q5_1)

which is bit-exactly what ``gguf``'s own dequantisation computes. ``decode`` produces that form,
``pack`` lays it out for the kernels (``csrc/kernels.h`` describes the byte layout); each format's
bits, groups and mode are in ``formats.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf import quants as gguf_quants

from dovetail.kernels.arena import WeightArena
from dovetail.kernels.formats import SCHEMES, Mode, Scheme

TILE = 16  # output rows per tile


@dataclass
class Decoded:
    """A weight [N, K] in integer form: ``q`` [N, K] uint8 (int8 bits for 8-bit), scales per row."""

    qtype: QT
    q: np.ndarray
    D: np.ndarray  # [N, K / superblock] float32
    Dm: np.ndarray | None  # [N, K / superblock] float32
    sc: np.ndarray | None  # [N, K / group] int8
    mn: np.ndarray | None  # [N, K / group] int8

    @property
    def scheme(self) -> Scheme:
        return SCHEMES[self.qtype]

    def take_rows(self, lo: int, hi: int) -> "Decoded":
        cut = lambda a: None if a is None else a[lo:hi]  # noqa: E731
        return Decoded(self.qtype, self.q[lo:hi], self.D[lo:hi], cut(self.Dm), cut(self.sc), cut(self.mn))

    def take_rows_index(self, index: np.ndarray) -> "Decoded":
        cut = lambda a: None if a is None else a[index]  # noqa: E731
        return Decoded(self.qtype, self.q[index], self.D[index], cut(self.Dm), cut(self.sc), cut(self.mn))

    def take_cols(self, lo: int, hi: int) -> "Decoded":
        """Inputs ``lo:hi``; both must lie on super-block boundaries (the caller checks)."""
        s = self.scheme
        sb = lambda a: None if a is None else a[:, lo // s.superblock:hi // s.superblock]  # noqa: E731
        gr = lambda a: None if a is None else a[:, lo // s.group:hi // s.group]  # noqa: E731
        return Decoded(self.qtype, self.q[:, lo:hi], sb(self.D), sb(self.Dm), gr(self.sc), gr(self.mn))


def packed_bytes(qtype: QT, rows: int, cols: int) -> int:
    """Bytes a [rows, cols] weight of ``qtype`` takes in the tile layout (what ``pack`` allocates)."""
    s = SCHEMES[qtype]
    tiles_rows = -(-rows // TILE) * TILE
    values = tiles_rows * cols // 32 * (32 if s.bits == 8 else 16 + (s.bits - 4) * 4)
    floats = tiles_rows * cols // s.superblock * 4 * (2 if s.mode in (Mode.ASYM_K, Mode.ASYM_BLOCK) else 1)
    ints = tiles_rows * cols // s.group * ((s.mode == Mode.SYM_K) + 2 * (s.mode == Mode.ASYM_K))
    return values + floats + ints


def block_shape(qtype: QT) -> tuple[int, int]:
    """(weights per block, bytes per block)."""
    return GGML_QUANT_SIZES[qtype]


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in Q4_K's 12 bytes."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q3k_scales(scales: np.ndarray) -> np.ndarray:
    """The 16 six-bit scales packed in Q3_K's 12 bytes, less their offset of 32: scale k has its
    low four bits in a nibble of bytes 0-7 (low nibbles first) and its top two in byte 8 + k % 4,
    at bit 2 * (k // 4)."""
    low, high = scales[..., 0:8], scales[..., 8:12]
    nibble = np.concatenate([low & 0x0F, low >> 4], axis=-1)
    top = (np.concatenate([high] * 4, axis=-1) >> np.repeat(np.arange(0, 8, 2, dtype=np.uint8), 4)) & 3
    return (nibble | (top << 4)).astype(np.int16) - 32


def decode(raw: np.ndarray, qtype: QT, rows: int, cols: int) -> Decoded:
    """GGUF blocks of a [rows, cols] weight (``raw`` as uint8, row-major) -> integer form.
    The values are extracted in C++ (``decode_values``); the per-block scales here."""
    from dovetail.kernels import ops

    if qtype not in SCHEMES:
        raise ValueError(f"GGUF type {qtype.name} has no quantized kernel")
    per, size = block_shape(qtype)
    if cols % per:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {per} weights, got {cols}")
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // per, size)
    with warnings.catch_warnings():  # a read-only memory map is only read here
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(b.reshape(rows, -1))
    q = ops().decode_values(blocks, int(qtype), rows, cols).numpy()
    nb = cols // per
    if qtype in (QT.Q4_0, QT.Q5_0, QT.Q8_0):
        return Decoded(qtype, q, _f16(b[..., 0:2]), None, None, None)
    if qtype in (QT.Q4_1, QT.Q5_1):
        return Decoded(qtype, q, _f16(b[..., 0:2]), _f16(b[..., 2:4]), None, None)
    if qtype in (QT.Q4_K, QT.Q5_K):
        sc, mn = _q4k_scale_min(b[..., 4:16])
        return Decoded(qtype, q, _f16(b[..., 0:2]), _f16(b[..., 2:4]), sc.reshape(rows, nb * 8).astype(np.int8),
                       mn.reshape(rows, nb * 8).astype(np.int8))
    if qtype == QT.Q3_K:
        sc = _q3k_scales(b[..., 96:108]).astype(np.int8)
        return Decoded(qtype, q, _f16(b[..., 108:110]), None, sc.reshape(rows, nb * 16), None)
    if qtype == QT.Q2_K:
        packed = b[..., 0:16]
        return Decoded(qtype, q, _f16(b[..., 80:82]), _f16(b[..., 82:84]),
                       (packed & 0x0F).astype(np.int8).reshape(rows, nb * 16),
                       (packed >> 4).astype(np.int8).reshape(rows, nb * 16))
    if qtype == QT.Q6_K:
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).reshape(rows, nb * 16)
        return Decoded(qtype, q, _f16(b[..., 208:210]), None, sc, None)
    raise AssertionError(qtype)


# -- the kernel's layout ---------------------------------------------------------------------
@dataclass
class PackedWeight:
    """A weight in the kernels' tile layout (tensors) plus its scheme and logical shape."""

    q: torch.Tensor
    D: torch.Tensor
    Dm: torch.Tensor
    sc: torch.Tensor
    mn: torch.Tensor
    rows: int
    cols: int
    qtype: QT

    @property
    def scheme(self) -> Scheme:
        return SCHEMES[self.qtype]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.D, self.Dm, self.sc, self.mn))

    def args(self) -> tuple:
        """The tensors and row count, as ``qmatmul``/``dequantize_rows`` take them first."""
        return (self.q, self.D, self.Dm, self.sc, self.mn, self.rows)

    def scheme_args(self) -> tuple:
        s = self.scheme
        return (s.bits, s.group, s.superblock, s.mode, s.zero)


def _tiles(a: np.ndarray | None, dtype) -> torch.Tensor:
    """Per-row metadata [N, G] -> [T, G, 16] (padded rows are zero)."""
    if a is None:
        return torch.empty(0, dtype=torch.float32 if dtype == np.float32 else torch.int8)
    n, g = a.shape
    t = -(-n // TILE)
    out = np.zeros((t * TILE, g), dtype=dtype)
    out[:n] = a
    return torch.from_numpy(np.ascontiguousarray(out.reshape(t, TILE, g).transpose(0, 2, 1)))


def pack(dec: Decoded, arena: WeightArena | None = None) -> PackedWeight:
    """Integer form -> tile layout: chunks of 16 rows x 4 inputs, nibbles and bit planes (in C++).
    With an ``arena``, the packed tensors live in it (on huge pages: ``arena.py``)."""
    from dovetail.kernels import ops

    n, k = dec.q.shape
    s = dec.scheme
    if k % s.superblock:
        raise ValueError(f"{dec.qtype.name}: {k} inputs is not a multiple of {s.superblock}")
    packed = ops().pack_values(torch.from_numpy(np.ascontiguousarray(dec.q).view(np.uint8)), s.bits)
    tensors = (packed, _tiles(dec.D, np.float32), _tiles(dec.Dm, np.float32), _tiles(dec.sc, np.int8),
               _tiles(dec.mn, np.int8))
    if arena is not None:
        tensors = tuple(arena.place(t) for t in tensors)
    return PackedWeight(*tensors, n, k, dec.qtype)


# -- float -> GGUF blocks (round to nearest) ------------------------------------------------------
def _to_f16_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.astype(np.float16)[..., None]).view(np.uint8)


def encode_q4_k(w: np.ndarray) -> np.ndarray:
    """Float [rows, cols] (cols % 256 == 0) -> Q4_K blocks: per 32 a 6-bit scale and min, rounded."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(rows, cols // 256, 8, 32)
    lo = np.minimum(x.min(-1), 0.0)
    hi = np.maximum(x.max(-1), lo)
    scale, mins = (hi - lo) / 15.0, -lo
    d = (scale.max(-1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = (mins.max(-1) / 63.0).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.rint(scale / d[..., None]), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin[..., None] > 0, np.rint(mins / dmin[..., None]), 0).clip(0, 63).astype(np.uint8)
        eff_s = d[..., None] * sc
        eff_m = dmin[..., None] * mn
        q = np.where(eff_s[..., None] > 0, np.rint((x + eff_m[..., None]) / eff_s[..., None]), 0)
    q = q.clip(0, 15).astype(np.uint8).reshape(rows, cols // 256, 4, 2, 32)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows, cols // 256, 128)
    scales = np.concatenate([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                             (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], axis=-1)
    out = np.concatenate([_to_f16_bytes(d), _to_f16_bytes(dmin), scales, qs], axis=-1)
    return out.reshape(rows, -1)


def encode_q6_k(w: np.ndarray) -> np.ndarray:
    """Float [rows, cols] (cols % 256 == 0) -> Q6_K blocks: per 16 an int8 scale, 6-bit values."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(rows, cols // 256, 16, 16)
    amax_idx = np.abs(x).argmax(-1)[..., None]
    peak = np.take_along_axis(x, amax_idx, -1)[..., 0]
    scale = peak / -32.0
    d = (np.abs(scale).max(-1) / 127.0).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.rint(scale / d[..., None]), 0).clip(-128, 127).astype(np.int8)
        eff = d[..., None] * sc
        q = np.where(eff[..., None] != 0, np.rint(x / eff[..., None]), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(rows, cols // 256, 2, 128)
    low = (q & 0x0F).reshape(rows, cols // 256, 2, 2, 64)
    ql = (low[:, :, :, 0] | (low[:, :, :, 1] << 4)).reshape(rows, cols // 256, 128)
    high = (q >> 4).reshape(rows, cols // 256, 2, 4, 32)
    qh = (high[:, :, :, 0] | (high[:, :, :, 1] << 2) | (high[:, :, :, 2] << 4) | (high[:, :, :, 3] << 6))
    out = np.concatenate([ql, qh.reshape(rows, cols // 256, 64), sc.view(np.uint8), _to_f16_bytes(d)], axis=-1)
    return out.reshape(rows, -1)


ENCODABLE = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q6_K)  # what ``encode`` makes

# Byte offsets of the float16 scales in a block of the formats ``encode`` does not make.
_F16_SCALES = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q5_K: (0, 2)}


def random_blocks(qtype: QT, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random blocks of any supported format (uint8 [rows, bytes]), for checks of formats that
    ``encode`` cannot round to: every value and integer scale random, the float16 scales small and
    positive, so the weights are finite. Other formats: ``encode`` of Gaussian weights."""
    rng = np.random.default_rng(seed)
    if qtype in ENCODABLE:
        return encode(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    per, size = block_shape(qtype)
    blocks = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    for offset in _F16_SCALES.get(qtype, ()):
        scale = rng.uniform(0.002, 0.02, (rows, cols // per)).astype(np.float16)
        blocks[..., offset:offset + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def encode(w: np.ndarray, qtype: QT) -> np.ndarray:
    """Float [rows, cols] -> GGUF blocks of ``qtype`` as uint8 [rows, bytes per row]."""
    if qtype == QT.Q4_K:
        return encode_q4_k(w)
    if qtype == QT.Q6_K:
        return encode_q6_k(w)
    rows = w.shape[0]
    return gguf_quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype).reshape(rows, -1)


def precision_format(precision: str, cols: int) -> QT:
    """The format a float weight of ``cols`` inputs is quantized to for ``int8``/``int4``."""
    if precision == "int8":
        return QT.Q8_0
    if precision == "int4":
        return QT.Q4_K if cols % 256 == 0 else QT.Q4_0
    raise ValueError(f"no quantized format for precision {precision!r}")
