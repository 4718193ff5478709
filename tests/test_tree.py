"""Tree structure, masks and EAGLE-2-style growth."""

import numpy as np
import pytest
import torch

from dovetail.models.tree import DraftTree, TreeBuilder, TreeShape, ancestry_matrix


def test_shape_parse_and_chain():
    assert TreeShape.parse("16,7,10") == TreeShape(16, 7, 10)
    assert TreeShape.parse("chain:4") == TreeShape(5, 4, 1) == TreeShape.chain(4)
    assert str(TreeShape.chain(3)) == "chain:3" and str(TreeShape(7, 4, 10)) == "7,4,10"
    with pytest.raises(ValueError):
        TreeShape(1, 1, 1)


def test_tree_must_be_parent_first():
    with pytest.raises(ValueError):
        DraftTree([5, 6, 7], [-1, 2, 0])


def test_ancestry_and_depths():
    #      0
    #    1   2
    #   3     4
    #   5
    tree = DraftTree([10, 11, 12, 13, 14, 15], [-1, 0, 0, 1, 2, 3])
    anc = tree.ancestry()
    assert anc[5].tolist() == [True, True, False, True, False, True]
    assert anc[4].tolist() == [True, False, True, False, True, False]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.children(0).tolist() == [1, 2] and tree.path_to(5) == [0, 1, 3, 5]
    assert np.array_equal(ancestry_matrix(tree.parents), anc)


def _fixed_expand(vocab=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.log_softmax(torch.randn(1000, vocab, generator=gen) * 3, dim=-1)
    calls = []

    def expand(frontier, tokens, parents):
        calls.append(list(frontier))
        # a deterministic function of the node's path, so scores are reproducible
        keys = [hash(tuple(tokens[DraftTree(tokens, parents).path_to(f)])) % 1000 for f in frontier]
        return table[keys]

    return expand, calls


def test_chain_is_top1_path():
    expand, calls = _fixed_expand()
    tree, grown = TreeBuilder(TreeShape.chain(4)).build(7, expand)
    assert tree.parents.tolist() == [-1, 0, 1, 2, 3]
    assert len(calls) == 4 and all(len(c) == 1 for c in calls)
    assert grown.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("shape", [TreeShape(16, 7, 10), TreeShape(7, 4, 10), TreeShape(8, 3, 3), TreeShape(4, 2, 2)])
def test_tree_budget_ancestry_closed_and_best_scores(shape):
    expand, calls = _fixed_expand(seed=shape.total_tokens)
    tree, grown = TreeBuilder(shape).build(3, expand)
    assert len(tree) == shape.total_tokens
    assert tree.depths.max() <= shape.depth
    assert len(calls) == shape.depth and all(len(c) <= shape.top_k for c in calls)
    # Every kept node's parent is kept (renumbered parent-first), and the grown ids are increasing.
    assert all(tree.parents[i] < i for i in range(1, len(tree)))
    assert np.all(np.diff(grown) > 0)
    # Siblings are ordered by draft score (best first): the first child of the root is its top-1.
    root_logp = expand([0], np.array([3]), np.array([-1]))[0]
    assert tree.tokens[tree.children(0)[0]] == int(root_logp.argmax())


@pytest.mark.parametrize("shape", [TreeShape.chain(6), TreeShape(16, 6, 3)])
@pytest.mark.parametrize("p_keep,p_grow", [(0.05, 0.3), (0.2, 0.2), (0.5, 0.9)])
def test_cut_offs_drop_unlikely_nodes_and_skip_their_levels(shape, p_keep, p_grow):
    """A tree grown with cut-offs is the same growth with every node under ``p_keep`` (cumulative
    draft probability) and its subtree dropped; only nodes at ``p_grow`` or more are expanded, so
    a level whose candidates are all under it costs no draft forward. Scores travel with the tree."""
    expand, calls = _fixed_expand(seed=shape.total_tokens)
    cut = TreeShape(shape.total_tokens, shape.depth, shape.top_k, p_keep, p_grow)
    tree, grown = TreeBuilder(cut).build(3, expand)
    probs = np.exp(tree.scores.astype(np.float64))
    assert probs[0] == 1.0 and np.all(probs[1:] >= p_keep * (1 - 1e-6))
    assert all(tree.parents[i] < i for i in range(1, len(tree))) and len(tree) <= shape.total_tokens
    assert all(calls[1:]), "a level with nothing to expand was run"
    kept_by_growth_id = dict(zip(grown.tolist(), probs.tolist()))
    for frontier in calls[1:]:  # the root is always expanded (its answer comes with the feed)
        assert all(kept_by_growth_id.get(n, 1.0) >= p_grow * (1 - 1e-6) for n in frontier)
    # cut-offs only remove: every kept path is one the uncut growth has, with the same score
    full, _ = TreeBuilder(TreeShape(10_000, shape.depth, shape.top_k)).build(3, _fixed_expand(seed=shape.total_tokens)[0])
    full_paths = {tuple(full.tokens[full.path_to(n)]): full.scores[n] for n in range(len(full))}
    for n in range(len(tree)):
        assert full_paths[tuple(tree.tokens[tree.path_to(n)])] == pytest.approx(tree.scores[n], abs=1e-5)
    if p_grow >= 0.5:  # strict enough here that some level is skipped
        assert len(calls) < shape.depth


def test_cut_offs_travel_as_message_fields():
    shape = TreeShape(9, 4, 2, 0.125, 0.5)
    assert TreeShape.from_fields(shape.fields()) == shape
    assert TreeShape.from_fields([5, 4, 1]) == TreeShape.chain(4)
    with pytest.raises(ValueError):
        TreeShape(5, 4, 1, p_keep=1.5)
