"""The KV cache every ``CachedLM`` keeps: transformers' ``DynamicCache`` with layers that append in
place.

``DynamicLayer.update`` concatenates, so each forward would copy the whole cache of every layer: at
4k tokens of context that moves as many bytes as the attention itself reads. Here each layer's
keys and values are prefix views of buffers with room to spare (grown by half when full), so a
forward writes only its new rows. Everything that reassigns ``keys``/``values`` (cropping, a
commit's slicing, a batched forward's concatenation) keeps working: a layer whose tensors are no
longer views of its buffer moves them into a fresh buffer on the next append.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROUND = 256  # capacity grows in multiples of this many positions


class AppendingLayer(DynamicLayer):
    _k: torch.Tensor | None = None
    _v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        total = n + key_states.shape[-2]
        if not self._holds(n, total):
            self._move(n, total, key_states)
        self._k[..., n:total, :] = key_states
        self._v[..., n:total, :] = value_states
        self.keys, self.values = self._k[..., :total, :], self._v[..., :total, :]
        return self.keys, self.values

    def _holds(self, n: int, total: int) -> bool:
        """Whether the current keys/values are the first ``n`` rows of buffers with room for ``total``."""
        buf = self._k
        if buf is None or buf.shape[-2] < total:
            return False
        if n == 0:
            return True
        return all(t.data_ptr() == b.data_ptr() and t.stride() == b.stride() and t.shape[:-2] == b.shape[:-2]
                   for t, b in ((self.keys, self._k), (self.values, self._v)))

    def _move(self, n: int, total: int, like: torch.Tensor) -> None:
        capacity = -(-max(total, total + total // 2) // ROUND) * ROUND
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        k = torch.empty(shape, dtype=like.dtype, device=like.device)
        v = torch.empty(shape, dtype=like.dtype, device=like.device)
        if n:
            k[..., :n, :] = self.keys
            v[..., :n, :] = self.values
        self._k, self._v = k, v

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
