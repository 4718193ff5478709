"""The collectives a tensor-parallel shard needs: all-reduce (sum) and all-gather (last dim).

* ``LocalCollective``: one shard, nothing to do.
* ``TorchDistributedCollective``: torch.distributed (gloo on CPU), over loopback TCP.
* ``ShmCollective``: shards on one machine exchange through one shared-memory segment. Each rank
  writes its tensor into its slot, publishes a sequence number, spins until every rank has
  published, then sums (or concatenates) all slots in rank order, so every rank gets bitwise the
  same result. Two slot banks alternate: a rank can only overwrite a bank after every rank has
  published the next sequence, i.e. after everyone finished reading it. Tensors larger than a
  slot go through in chunks. Publication relies on x86's store ordering (TSO).

``bench/results/actors.json`` has the measured latency of gloo and of the shared-memory exchange.
"""

from __future__ import annotations

import time
from multiprocessing import resource_tracker, shared_memory
from typing import Protocol

import numpy as np
import torch

CACHE_LINE = 64
SLOT_BYTES = 8 << 20
SPIN_S = 50e-6  # busy-wait this long, then yield the CPU between checks


class Collective(Protocol):
    world_size: int
    rank: int

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor: ...


class LocalCollective:
    world_size, rank = 1, 0

    def all_reduce(self, tensor):
        return tensor

    def all_gather_last_dim(self, tensor):
        return tensor


class TorchDistributedCollective:
    """Collectives over an initialised ``torch.distributed`` process group (gloo on CPU)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()

    def all_reduce(self, tensor):
        self.dist.all_reduce(tensor)
        return tensor

    def all_gather_last_dim(self, tensor):
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self.dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=-1)


def shm_collective_bytes(world_size: int, slot_bytes: int = SLOT_BYTES) -> int:
    """Size of the segment a ``ShmCollective`` group needs (the coordinator creates it)."""
    return CACHE_LINE * world_size + 2 * world_size * slot_bytes


class ShmCollective:
    def __init__(self, segment: str, world_size: int, rank: int, slot_bytes: int = SLOT_BYTES,
                 timeout_s: float = 60.0):
        self._shm = shared_memory.SharedMemory(name=segment)
        resource_tracker.unregister(self._shm._name, "shared_memory")  # the creator unlinks it
        self.world_size, self.rank, self.slot_bytes, self.timeout_s = world_size, rank, slot_bytes, timeout_s
        buf = self._shm.buf
        self._published = np.ndarray((world_size, CACHE_LINE // 8), np.int64, buf)[:, 0]
        self._slots = np.ndarray((2, world_size, slot_bytes), np.uint8, buf, offset=CACHE_LINE * world_size)
        self._seq = int(self._published[rank])

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.contiguous().view(-1)
        out = torch.empty_like(flat)
        for start, parts in self._chunks(flat):
            total = parts[0].clone()
            for part in parts[1:]:
                total += part
            out[start:start + len(total)] = total
        tensor.copy_(out.view(tensor.shape))
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.contiguous().view(-1)
        gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
        for start, parts in self._chunks(flat):
            for dst, part in zip(gathered, parts):
                dst[start:start + len(part)] = part
        return torch.cat([g.view(tensor.shape) for g in gathered], dim=-1)

    def _chunks(self, flat: torch.Tensor):
        """Exchange ``flat`` slot by slot; yield (element offset, every rank's chunk in rank order)."""
        per_slot = self.slot_bytes // flat.element_size()
        for start in range(0, max(len(flat), 1), per_slot):
            chunk = flat[start:start + per_slot]
            yield start, self._exchange(chunk)

    def _exchange(self, chunk: torch.Tensor) -> list[torch.Tensor]:
        self._seq += 1
        bank = self._slots[self._seq % 2]
        nbytes = chunk.numel() * chunk.element_size()
        bank[self.rank, :nbytes] = chunk.view(torch.uint8).numpy() if nbytes else bank[self.rank, :0]
        self._published[self.rank] = self._seq  # after the data: x86 keeps store order
        self._wait_all()
        return [torch.from_numpy(bank[r, :nbytes]).view(chunk.dtype) for r in range(self.world_size)]

    def _wait_all(self) -> None:
        start = time.perf_counter()
        while self._published.min() < self._seq:
            waited = time.perf_counter() - start
            if waited > SPIN_S:
                if waited > self.timeout_s:
                    raise RuntimeError(f"shard collective: a peer shard did not arrive within {self.timeout_s:.0f}s")
                time.sleep(0)

    def close(self) -> None:
        self._published = self._slots = None
        try:
            self._shm.close()
        except BufferError:
            pass
