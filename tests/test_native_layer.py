"""The native decoder (``decoder_layers``, kernels/csrc/layer.cpp) is the per-operator path of
``fast_forward`` in one call: for every family, the same hidden states, logits and KV cache bits
for one row, a prompt's rows, a tree and a batch of requests, on the best kernel path and the
portable one."""

import numpy as np
import pytest
import torch

from dovetail.models.cached_lm import CachedLM, forward_trees
from dovetail.models.quantized import load_quantized
from dovetail.models.tree import DraftTree
from dovetail.store import resolve_model
from test_architectures import ARCHS, PROMPT, family_files


class Counted:
    """The kernels, counting the native decoder's calls."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __getattr__(self, name):
        if name == "decoder_layers":
            self.calls += 1
        return getattr(self.real, name)


def pair(path):
    """Two caches over one native model: the native decoder, and the per-operator path alone."""
    model = load_quantized(resolve_model(str(path)), "native")
    native, per_op = CachedLM(model, keep_hidden=True), CachedLM(model, keep_hidden=True)
    assert native.fast.decoder is not None
    per_op.fast.decoder = None
    native.fast.ops = Counted(native.fast.ops)
    return native, per_op


def same(a: CachedLM, b: CachedLM, got_a, got_b):
    assert torch.equal(got_a, got_b)
    assert torch.equal(a.last_hidden, b.last_hidden)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


@pytest.mark.parametrize("arch, isa", [(arch, "") for arch in ARCHS] + [("qwen2", "scalar"), ("gemma3", "scalar")])
def test_the_native_layer_gives_the_per_operator_bits(tmp_path, isolated_home, monkeypatch, arch, isa):
    monkeypatch.setenv("DOVETAIL_KERNEL_ISA", isa)
    native, per_op = pair(family_files(tmp_path, arch)["target"])
    same(native, per_op, native.extend(PROMPT, logits_to_keep=0), per_op.extend(PROMPT, logits_to_keep=0))
    same(native, per_op, native.extend([7]), per_op.extend([7]))  # one row
    tokens, parents = np.array([4, 9, 11, 20, 6]), np.array([-1, 0, 0, 1, 3])  # a tree: two branches
    for nodes in (range(3), range(3, 5)):  # the second block sees its pending ancestors
        same(native, per_op, native.forward_tree(tokens, parents, nodes, native.committed),
             per_op.forward_tree(tokens, parents, nodes, per_op.committed))
    assert native.commit([0, 1, 3]) == per_op.commit([0, 1, 3]) == 3
    same(native, per_op, native.extend([12]), per_op.extend([12]))
    assert native.fast.ops.calls == 5  # every forward ran natively


def test_a_batch_of_requests_runs_the_native_layers_with_the_same_bits(tmp_path, isolated_home):
    native, per_op = pair(family_files(tmp_path, "qwen2")["target"])
    trees = [DraftTree(np.array([7, 8, 9, 10]), np.array([-1, 0, 0, 1])), DraftTree(np.array([3, 5]), np.array([-1, 0]))]
    results = []
    for lm in (native, per_op):
        lms = [lm.fresh() for _ in trees]
        for i, other in enumerate(lms):
            other.extend(PROMPT[:5 + 3 * i])
        results.append((lms, forward_trees(lms, trees)))
    (lms_a, got_a), (lms_b, got_b) = results
    for a, b, ga, gb in zip(lms_a, lms_b, got_a, got_b):
        same(a, b, ga, gb)
    assert native.fast.ops.calls == 3  # two prompts, then the batch


@pytest.mark.parametrize("arch", ARCHS)
def test_the_rotary_tables_are_the_modules_own_rows(tmp_path, isolated_home, arch):
    """The lean forward looks cos/sin up in tables it computed once; every row is what the rotary
    module gives for that forward's positions (a tree's repeat ones, a jump past the table)."""
    lm = CachedLM(load_quantized(resolve_model(str(family_files(tmp_path, arch)["target"])), "native"))
    fast = lm.fast
    assert fast.static_rope
    h = torch.zeros(1, 1, 8)
    with torch.inference_mode():
        for positions in ([0], [5, 6, 6, 7], list(range(40, 77)), [3000, 3001], [17]):
            positions = torch.tensor(positions)
            got = fast._rotary(h, positions)
            for kind in fast.rope_kinds:
                cos, sin = fast.rotary(h, positions.view(1, -1), *((kind,) if kind else ()))
                assert torch.equal(got[kind][0], cos[0]) and torch.equal(got[kind][1], sin[0])
