"""The tree KV cache: tree-masked forwards equal sequential ones; commit compacts the path."""

import numpy as np
import pytest
import torch

from dovetail.models.cached_lm import CachedLM
from dovetail.models.tree import DraftTree
from tiny_models import tiny_model

TREE = DraftTree([5, 6, 7, 8, 9, 10], [-1, 0, 0, 1, 1, 3])  # root, two branches, a grandchild chain


@pytest.fixture(params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param, seed=3)


def _sequential_logits(model, prefix, path_tokens):
    with torch.inference_mode():
        return model(torch.tensor([prefix + path_tokens])).logits[0, -1].float()


def test_tree_mask_matches_sequential_forwards(model):
    prefix = [3, 14, 15, 92, 65]
    lm = CachedLM(model)
    lm.extend(prefix)
    logits = lm.forward_tree(TREE.tokens, TREE.parents, range(len(TREE)), lm.committed)
    for node in range(len(TREE)):
        path = [int(TREE.tokens[n]) for n in TREE.path_to(node)]
        torch.testing.assert_close(logits[node], _sequential_logits(model, prefix, path), atol=1e-4, rtol=1e-4)


def test_levelwise_tree_writes_see_pending_ancestors(model):
    """A tree written level by level (as the draft does) sees its pending ancestors."""
    prefix = [3, 14, 15]
    lm = CachedLM(model)
    lm.extend(prefix + [int(TREE.tokens[0])])  # the draft commits the root itself
    base = lm.committed - 1
    lm.forward_tree(TREE.tokens, TREE.parents, [1, 2], base)
    lm.forward_tree(TREE.tokens, TREE.parents, [3, 4], base)
    deep = lm.forward_tree(TREE.tokens, TREE.parents, [5], base)
    expected = _sequential_logits(model, prefix, [int(TREE.tokens[n]) for n in TREE.path_to(5)])
    torch.testing.assert_close(deep[0], expected, atol=1e-4, rtol=1e-4)


def test_commit_compacts_accepted_path(model):
    prefix = [3, 14, 15, 92]
    lm = CachedLM(model)
    lm.extend(prefix)
    lm.forward_tree(TREE.tokens, TREE.parents, range(len(TREE)), lm.committed)
    kept = lm.commit([0, 1, 3, 5])
    assert kept == 4 and lm.committed == len(prefix) + 4
    ref = CachedLM(model)
    ref.extend(prefix + [int(t) for t in TREE.tokens[[0, 1, 3, 5]]])
    for got, want in zip(lm.cache.layers, ref.cache.layers):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
    # Decoding continues exactly as if the path had been fed sequentially.
    torch.testing.assert_close(lm.extend([42])[-1], ref.extend([42])[-1], atol=1e-4, rtol=1e-4)


def test_commit_stops_at_first_unwritten_node(model):
    lm = CachedLM(model)
    lm.extend([3, 4])
    lm.forward_tree(TREE.tokens, TREE.parents, [0, 1], lm.committed)
    assert lm.commit([0, 1, 3]) == 2  # node 3 was never written
    assert lm.committed == 4 and lm.cache.get_seq_length() == 4


def test_rollback_and_extend_refuses_pending(model):
    lm = CachedLM(model)
    lm.extend([3, 4, 5, 6])
    lm.forward_tree(TREE.tokens, TREE.parents, [0], lm.committed)
    with pytest.raises(RuntimeError):
        lm.extend([7])
    lm.rollback(2)
    assert lm.committed == 2 and lm.cache.get_seq_length() == 2
