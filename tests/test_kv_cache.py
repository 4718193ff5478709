"""The appending KV cache (models/kv_cache.py) holds exactly what concatenation would, without
copying the cache on every append, and survives everything that reassigns a layer's tensors."""

import torch

from dovetail.models.kv_cache import AppendingLayer, appending_cache
from tiny_models import tiny_model


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)


def test_appending_matches_concatenation_through_crops_and_reassignment():
    layer, want_k, want_v = AppendingLayer(), torch.empty(1, 2, 0, 8), torch.empty(1, 2, 0, 8)
    for step, n in enumerate([5, 1, 1, 300, 3, 1]):
        k, v = rows(n, step)
        got_k, got_v = layer.update(k, v)
        want_k, want_v = torch.cat([want_k, k], 2), torch.cat([want_v, v], 2)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        if step == 2:  # a rollback
            layer.crop(-2)
            want_k, want_v = want_k[:, :, :-2], want_v[:, :, :-2]
        if step == 4:  # a batched forward hands back concatenated tensors
            extra_k, extra_v = rows(2, 99)
            layer.keys, layer.values = torch.cat([layer.keys, extra_k], 2), torch.cat([layer.values, extra_v], 2)
            want_k, want_v = torch.cat([want_k, extra_k], 2), torch.cat([want_v, extra_v], 2)
    assert layer.get_seq_length() == want_k.shape[2]


def test_an_append_with_room_to_spare_copies_nothing():
    layer = AppendingLayer()
    layer.update(*rows(10, 0))
    buffer = layer.keys.data_ptr()
    for i in range(50):
        layer.update(*rows(1, i + 1))
        assert layer.keys.data_ptr() == buffer  # the prefix grew in place
    layer.keys = layer.keys[:, :, :30]  # a commit keeps a prefix: still the same buffer
    layer.values = layer.values[:, :, :30]
    layer.update(*rows(1, 99))
    assert layer.keys.data_ptr() == buffer and layer.get_seq_length() == 31


def test_the_cache_of_a_model_appends_in_place():
    cache = appending_cache(tiny_model("qwen2").config)
    assert cache.layers and all(isinstance(layer, AppendingLayer) for layer in cache.layers)


def test_reserved_rows_are_written_in_place_and_survive_keeping_and_copying():
    import copy

    layer, like = AppendingLayer(), torch.empty(1, 2, 0, 8)
    layer.update(*rows(4, 0))
    n = layer.reserve(like, 3)  # what the native decoder layer does: room, then rows written into _k/_v
    k, v = rows(3, 1)
    layer._k[:, :, n:n + 3], layer._v[:, :, n:n + 3] = k, v
    assert n == 4 and layer.get_seq_length() == 7 and torch.equal(layer.keys[:, :, 4:], k)
    layer.keep(5)  # a commit keeps the first pending entry
    assert layer.get_seq_length() == 5 and torch.equal(layer.values[:, :, 4], v[:, :, 0])
    twin = copy.deepcopy(layer)
    assert twin.reserve(like, 1) == 5 and torch.equal(twin.keys[:, :, :5], layer.keys)
