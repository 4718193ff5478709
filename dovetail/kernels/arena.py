"""Packed weights on transparent huge pages.

A decode step streams every packed weight once (about 1 GB for the packaged 1.5B target) through
the tile kernels' sequential reads. On 4 KiB pages that stream crosses a page every 64 cache
lines, and each crossing costs a TLB miss and restarts the hardware prefetcher; on 2 MiB pages it
crosses one every 32,768. Large matrices stream markedly faster from huge pages, and the whole
forward with them (``bench --suite profile``'s ``pages`` rows compare the two in one process;
docs/benchmarks.md has the figures). Loading pays once, to fault the huge pages in and copy the
weights over.

Most Linux systems run transparent huge pages in ``madvise`` mode, so memory gets them only
when it asks: an arena maps anonymous memory in slabs aligned to 2 MiB, asks for huge pages
(``MADV_HUGEPAGE``) before the first touch, and copies each packed tensor into it. The kernel
may still hand out 4 KiB pages (fragmented memory, THP off): that costs speed, never correctness.
``DOVETAIL_HUGE_PAGES=0`` turns the arena off (a plain tensor per weight), for comparisons.
"""

from __future__ import annotations

import mmap
import os
import re

import torch

HUGE_PAGE = 2 << 20
SLAB = 64 << 20  # one mapping holds many small tensors; a tensor above SLAB / 4 gets its own
ALIGN = 64  # a cache line: every tensor starts on one, as the kernels' vector loads like


def enabled() -> bool:
    """Whether weights go to huge pages here: Linux's ``madvise`` exists and the user left it on."""
    return hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("DOVETAIL_HUGE_PAGES", "1") != "0"


class _Slab:
    """One anonymous private mapping whose usable part starts on a 2 MiB boundary."""

    def __init__(self, size: int):
        size = -(-size // HUGE_PAGE) * HUGE_PAGE
        self.map = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.map.madvise(mmap.MADV_HUGEPAGE)  # before any page is touched: faults then take 2 MiB
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)  # tensors viewing it keep it mapped
        self.used = (-self.bytes.data_ptr()) % HUGE_PAGE
        self.end = self.used + size

    def take(self, nbytes: int) -> torch.Tensor | None:
        start = -(-self.used // ALIGN) * ALIGN
        if start + nbytes > self.end:
            return None
        self.used = start + nbytes
        return self.bytes[start:start + nbytes]


class WeightArena:
    """Where one model's packed weights live: ``place`` copies a tensor in and returns the copy.

    Slabs are freed when the last tensor viewing them is, so an arena lives exactly as long as
    the model whose weights it holds (the arena keeps only the slab it is filling)."""

    def __init__(self):
        self.on = enabled()
        self._slab: _Slab | None = None

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        if not self.on or nbytes == 0:
            return tensor
        if nbytes > SLAB // 4:
            region = _Slab(nbytes).take(nbytes)
        else:
            region = self._slab.take(nbytes) if self._slab else None
            if region is None:
                self._slab = _Slab(SLAB)
                region = self._slab.take(nbytes)
        out = region.view(tensor.dtype).view(tensor.shape)
        out.copy_(tensor)
        return out


def thp_mode() -> str | None:
    """The system's transparent-huge-page mode (``always``, ``madvise``, ``never``), or None."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else None


def describe() -> str:
    """One line for ``check``: whether this process's weights stream from huge pages."""
    if not enabled():
        return "weights on 4 KiB pages (DOVETAIL_HUGE_PAGES=0, or no madvise here)"
    mode, held = thp_mode(), huge_page_bytes()
    if mode == "never":
        return ("weights on 4 KiB pages: transparent huge pages are off here (as root: "
                "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled); decoding streams them slower")
    return f"{held / 2**20:,.0f} MB of this process on 2 MiB pages (THP {mode})" if held is not None else \
        "weights asked for huge pages (their use is not reported here)"


def huge_page_bytes() -> int | None:
    """Bytes of this process's anonymous memory on huge pages (Linux), or None where unknown."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            found = re.search(r"AnonHugePages:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None
