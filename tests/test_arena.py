"""Packed weights on huge pages (kernels/arena.py): the same bits and results wherever a weight
lives, whole 2 MiB pages where the kernel grants them, and memory returned with the model."""

import gc
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from dovetail.kernels import ops
from dovetail.kernels.arena import ALIGN, HUGE_PAGE, SLAB, WeightArena, describe, huge_page_bytes, thp_mode
from dovetail.kernels.packing import decode, pack, random_blocks

@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q8_0])
def test_a_weight_in_the_arena_computes_the_same_bits(qtype):
    raw = random_blocks(qtype, 96, 512, seed=3)
    plain, placed = pack(decode(raw, qtype, 96, 512)), pack(decode(raw, qtype, 96, 512), WeightArena())
    x = torch.randn(5, 512)
    for name in ("q", "D", "Dm", "sc", "mn"):
        a, b = getattr(plain, name), getattr(placed, name)
        assert torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
        if b.numel() and WeightArena().on:
            assert b.data_ptr() % ALIGN == 0 and b.data_ptr() != a.data_ptr()
    y_plain = ops().qmatmul(x, *plain.args(), *plain.scheme_args(), 0)
    y_placed = ops().qmatmul(x, *placed.args(), *placed.scheme_args(), 0)
    assert torch.equal(y_plain, y_placed)


def test_small_tensors_share_a_slab_and_large_ones_get_their_own():
    arena = WeightArena()
    if not arena.on:
        pytest.skip("no madvise(MADV_HUGEPAGE) here")
    small = [arena.place(torch.full((1000 + i,), i, dtype=torch.uint8)) for i in range(50)]
    for i, t in enumerate(small):
        assert torch.all(t == i) and t.data_ptr() % ALIGN == 0
    starts = sorted(t.data_ptr() for t in small)
    assert starts[-1] - starts[0] < SLAB  # one mapping
    big = arena.place(torch.arange(SLAB // 4 + 4096, dtype=torch.uint8))
    assert big.data_ptr() % HUGE_PAGE == 0  # its own mapping, from a page boundary
    assert torch.equal(big, torch.arange(SLAB // 4 + 4096, dtype=torch.uint8))


def test_the_switch_turns_the_arena_off(monkeypatch):
    monkeypatch.setenv("DOVETAIL_HUGE_PAGES", "0")
    t = torch.ones(4096)
    assert WeightArena().place(t) is t


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_a_large_weight_lands_on_huge_pages():
    before = huge_page_bytes()
    arena = WeightArena()
    t = arena.place(torch.ones(3 * HUGE_PAGE, dtype=torch.uint8))
    after = huge_page_bytes()
    # The kernel may refuse a huge page when memory is fragmented; on a machine with free memory it
    # grants at least one of the three whole pages (a leak-free test cannot demand all of them).
    assert after - before >= HUGE_PAGE, (before, after)
    del t, arena
    gc.collect()
    assert huge_page_bytes() <= after - HUGE_PAGE  # unmapped with its last tensor


def test_a_slab_is_unmapped_with_its_last_tensor():
    arena = WeightArena()
    if not arena.on:
        pytest.skip("no madvise(MADV_HUGEPAGE) here")
    t = arena.place(torch.ones(SLAB // 4 + 1, dtype=torch.uint8))
    maps = Path("/proc/self/maps")
    start = t.data_ptr()

    def mapped() -> bool:
        for line in maps.read_text().splitlines():
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if lo <= start < hi:
                return True
        return False

    assert mapped()
    del t, arena
    gc.collect()
    assert not mapped()


def test_check_says_where_the_weights_stream_from(monkeypatch):
    assert "MB of this process on 2 MiB pages" in describe() or thp_mode() in (None, "never")
    monkeypatch.setenv("DOVETAIL_HUGE_PAGES", "0")
    assert describe().startswith("weights on 4 KiB pages")
