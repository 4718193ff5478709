"""The KV cache every ``CachedLM`` keeps: transformers' ``DynamicCache`` with layers that append in
place.

``DynamicLayer.update`` concatenates, so each forward would copy the whole cache of every layer: at
4k tokens of context that moves as many bytes as the attention itself reads. Here each layer's
keys and values are prefix views of buffers with room to spare (grown by half when full), so a
forward writes only its new rows. Everything that reassigns ``keys``/``values`` (cropping, a
commit's slicing, a batched forward's concatenation) keeps working: an assigned prefix of the
buffer is taken as a new length, anything else is kept as it is and moved into a fresh buffer on
the next append.

The views are made when ``keys``/``values`` are read, not at each append: the lean forward
(``fast_forward``) appends to every layer of every forward (``reserve``), where a few microseconds
a layer add up to a share of a small model's step.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROUND = 256  # capacity grows in multiples of this many positions


def _prefix_of(t, buffer: torch.Tensor | None) -> bool:
    """Whether ``t`` is the first rows of ``buffer`` ([..., rows, head_dim], dim -2 cut short)."""
    return (buffer is not None and isinstance(t, torch.Tensor) and t.data_ptr() == buffer.data_ptr()
            and t.stride() == buffer.stride() and t.shape[:-2] == buffer.shape[:-2] and t.shape[-1] == buffer.shape[-1])


class AppendingLayer(DynamicLayer):
    _k: torch.Tensor | None = None  # the buffers
    _v: torch.Tensor | None = None
    _kn: int | None = None  # keys / values are the first _kn / _vn rows of the buffers,
    _vn: int | None = None
    _kx = _vx = None  # or (None) what was assigned from outside (a tensor, or None)

    @property
    def keys(self):
        return self._k.narrow(-2, 0, self._kn) if self._kn is not None else self._kx

    @keys.setter
    def keys(self, t):
        self._kn, self._kx = (t.shape[-2], None) if _prefix_of(t, self._k) else (None, t)

    @property
    def values(self):
        return self._v.narrow(-2, 0, self._vn) if self._vn is not None else self._vx

    @values.setter
    def values(self, t):
        self._vn, self._vx = (t.shape[-2], None) if _prefix_of(t, self._v) else (None, t)

    def get_seq_length(self) -> int:
        return self._kn if self._kn is not None else super().get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = self.reserve(key_states, key_states.shape[-2])
        total = n + key_states.shape[-2]
        self._k[..., n:total, :] = key_states
        self._v[..., n:total, :] = value_states
        return self.keys, self.values

    def reserve(self, like: torch.Tensor, length: int) -> int:
        """Room for ``length`` more rows shaped like ``like`` ([..., heads, rows, head_dim]): keys
        and values grow over them and the row they start at is returned; the caller writes them into
        the buffers ``_k`` and ``_v`` (``update``, or the native decoder layer of ``fast_forward``)."""
        if self._kn is not None and self._kn == self._vn and self._kn + length <= self._k.shape[-2]:
            n = self._kn
        else:
            if not self.is_initialized:
                self.lazy_initialization(like, like)
            n = self.keys.shape[-2] if self.keys.numel() else 0
            self._move(n, n + length, like)
        self._kn = self._vn = n + length
        self._kx = self._vx = None
        return n

    def keep(self, rows: int) -> None:
        """Keep the first ``rows`` entries (what slicing keys and values to them does)."""
        if self._kn is not None and self._vn is not None:
            self._kn = self._vn = rows
        else:
            self.keys, self.values = self.keys[..., :rows, :], self.values[..., :rows, :]

    def _move(self, n: int, total: int, like: torch.Tensor) -> None:
        """Fresh buffers with room for ``total`` rows, the current ``n`` rows copied in."""
        capacity = -(-max(total, total + total // 2) // ROUND) * ROUND
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        k = torch.empty(shape, dtype=like.dtype, device=like.device)
        v = torch.empty(shape, dtype=like.dtype, device=like.device)
        if n:
            k[..., :n, :] = self.keys
            v[..., :n, :] = self.values
        self._k, self._v = k, v

    @classmethod
    def joined(cls, layers: list[DynamicLayer], room: int) -> "AppendingLayer":
        """The entries of ``layers`` side by side along the rows (what concatenating them gives), in
        buffers with room for ``room`` more rows: a batched forward's scratch cache."""
        layer = cls()
        parts = [(other.keys, other.values) for other in layers if other.is_initialized and other.keys.numel()]
        if not parts:
            return layer
        like = parts[0][0]
        layer.lazy_initialization(like, like)
        total = sum(k.shape[-2] for k, _ in parts)
        shape = (*like.shape[:-2], total + room, like.shape[-1])
        layer._k = torch.empty(shape, dtype=like.dtype, device=like.device)
        layer._v = torch.empty(shape, dtype=like.dtype, device=like.device)
        row = 0
        for k, v in parts:
            layer._k[..., row:row + k.shape[-2], :] = k
            layer._v[..., row:row + k.shape[-2], :] = v
            row += k.shape[-2]
        layer.keys, layer.values = layer._k.narrow(-2, 0, total), layer._v.narrow(-2, 0, total)
        return layer

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()


def appending_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose layers all append in place and keep every row, the
    sliding-window ones too: the window is applied by the attention mask, so a cache's entries are
    always its positions in order (what committing a tree and batching requests rely on)."""
    cache = DynamicCache(config=config)
    cache.layers = [AppendingLayer() for _ in cache.layers]
    return cache
