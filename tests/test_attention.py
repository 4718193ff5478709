"""The row attention kernel (``row_attention``, kernels/csrc/attention.h): every kernel path gives the same
bits, a query row's output does not depend on the rows computed beside it (decoding alone,
verifying a tree, a block of prompt rows, any thread count), and it computes softmax attention."""

import pytest
import torch

from dovetail.kernels import ops

PATHS = list(range(1, ops().best_isa() + 1))  # 1 scalar, 2 AVX2, 3 AVX-512: those this CPU runs


def case(H=12, Hkv=2, Lq=5, Lk=300, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g) * 2 for s in ((H, Lq, d), (Hkv, Lk, d), (Hkv, Lk, d)))
    # a tree after a shared prefix: each row sees the prefix, itself and some of the rows before it
    visible = torch.zeros(Lq, Lk, dtype=torch.bool)
    visible[:, :Lk - Lq] = True
    for i in range(Lq):
        visible[i, Lk - Lq + i] = True
        visible[i, Lk - Lq:Lk - Lq + i] = torch.rand(i, generator=g) < 0.5
    return q, k, v, visible


def reference(q, k, v, visible, scale):
    H, Hkv = q.shape[0], k.shape[0]
    k, v = (t.double().repeat_interleave(H // Hkv, 0) for t in (k, v))
    scores = (q.double() @ k.transpose(1, 2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)  # [Lq, H, d]


@pytest.mark.parametrize("d", [128, 64, 80, 16])
def test_every_path_gives_the_same_bits_and_computes_attention(d):
    q, k, v, visible = case(d=d, Lq=7)
    outs = [ops().row_attention(q, k, v, visible, d ** -0.5, isa) for isa in PATHS]
    for out in outs[1:]:
        assert torch.equal(out, outs[0]), "attention paths disagree"
    want = reference(q, k, v, visible, d ** -0.5)
    assert (outs[0].double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_is_computed_independently_of_the_rows_beside_it(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, visible = case(Lq=37, Lk=400)  # more than one block of rows
        block = ops().row_attention(q, k, v, visible, 0.09)
        for i in (0, 5, 16, 36):
            alone = ops().row_attention(q[:, i:i + 1], k, v, visible[i:i + 1], 0.09)
            assert torch.equal(alone[0], block[i])
        assert torch.equal(ops().row_attention(q[:, 3:21], k, v, visible[3:21], 0.09), block[3:21])
    finally:
        torch.set_num_threads(before)


def test_a_row_that_sees_no_key_gets_zeros_and_huge_gaps_underflow_cleanly():
    q, k, v, visible = case(Lq=3, Lk=40, d=32)
    visible[1] = False
    q[:, 2] *= 1e4  # scores far apart: most weights underflow to exactly zero
    out = ops().row_attention(q, k, v, visible, 1.0)
    assert not out[1].any()
    assert torch.isfinite(out).all()


def test_keys_and_values_may_be_views_into_a_larger_buffer():
    """The KV cache hands over prefix views of buffers with spare room (models/kv_cache.py)."""
    q, k, v, visible = case(Lq=4, Lk=100)
    big_k, big_v = torch.randn(2, 160, 128), torch.randn(2, 160, 128)
    big_k[:, :100], big_v[:, :100] = k, v
    want = ops().row_attention(q, k, v, visible, 0.1)
    assert torch.equal(ops().row_attention(q, big_k[:, :100], big_v[:, :100], visible, 0.1), want)


@pytest.mark.parametrize("option", ["softcap", "s_aux"])
def test_an_attention_option_it_does_not_implement_is_refused_not_ignored(option):
    from dovetail.models.row_attention import row_attention_forward

    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 4, 5, 16)
    row_attention_forward(None, q, kv, kv, None)  # without it: computed
    with pytest.raises(ValueError, match=option):
        row_attention_forward(None, q, kv, kv, None, **{option: 30.0})
