"""Machine topology: NUMA sockets with their CPUs and memory (sysfs), and GPUs (torch).

``detect()`` reads /sys/devices/system/node; ``parse_sockets("0|1")`` carves *virtual* sockets
out of CPU lists (tests on one-node machines); both produce the same ``Topology`` that the
placement code consumes, so a virtual topology runs exactly the real code path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dovetail.errors import UserError

SYSFS_NODES = Path("/sys/devices/system/node")


@dataclass(frozen=True)
class Socket:
    index: int
    cpus: tuple[int, ...]
    memory_bytes: int | None = None  # None: unknown (virtual socket)
    numa_node: int | None = None  # the NUMA node whose memory policy applies (None: virtual)


@dataclass(frozen=True)
class Topology:
    sockets: tuple[Socket, ...]
    gpus: tuple[str, ...] = field(default_factory=tuple)
    source: str = "sysfs"

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(c for s in self.sockets for c in s.cpus)

    def partition(self, index: int, count: int) -> "Topology":
        """Part ``index`` of ``count`` equal shares of the machine (one per serving replica).

        Whole sockets when ``count`` divides the socket count (each replica keeps its sockets'
        NUMA memory); otherwise every socket's CPUs are split ``count`` ways and each part gets
        one slice of every socket."""
        if count == 1:
            return self
        if not 0 <= index < count:
            raise UserError(f"replica part {index} of {count} does not exist")
        n = len(self.sockets)
        if n % count == 0:
            share = n // count
            picked = self.sockets[index * share:(index + 1) * share]
            sockets = tuple(Socket(i, s.cpus, s.memory_bytes, s.numa_node) for i, s in enumerate(picked))
        else:
            too_small = [s.index for s in self.sockets if len(s.cpus) < count]
            if too_small:
                raise UserError(f"cannot split the machine into {count} replicas: socket(s) {too_small} have fewer "
                                f"than {count} CPUs and {n} socket(s) do not divide evenly; use fewer replicas "
                                "or --sockets")
            sockets = tuple(Socket(s.index, _slice(s.cpus, index, count), None if s.memory_bytes is None
                                   else s.memory_bytes // count, s.numa_node) for s in self.sockets)
        return Topology(sockets, self.gpus, f"{self.source}, replica part {index + 1}/{count}")


def default_threads() -> int:
    """Torch threads for an engine that runs in this process alone: one per CPU it may use."""
    return len(os.sched_getaffinity(0))


def _slice(cpus: tuple[int, ...], index: int, count: int) -> tuple[int, ...]:
    bounds = [round(i * len(cpus) / count) for i in range(count + 1)]
    return cpus[bounds[index]:bounds[index + 1]]


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    cpus: list[int] = []
    for part in filter(None, (p.strip() for p in text.strip().split(","))):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise UserError(f"bad CPU list {text!r}: use forms like 0-3,8")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise UserError(f"bad CPU range {part!r} in {text!r}")
        cpus.extend(range(lo, hi + 1))
    if len(set(cpus)) != len(cpus):
        raise UserError(f"CPU list {text!r} names a CPU twice")
    return tuple(cpus)


def parse_sockets(spec: str, available: set[int] | None = None) -> Topology:
    """Virtual sockets from ``"0|1"`` or ``"0-3|4-7"``: one CPU list per socket, '|' between."""
    available = set(os.sched_getaffinity(0)) if available is None else available
    sockets = []
    seen: set[int] = set()
    for index, part in enumerate(spec.split("|")):
        cpus = parse_cpu_list(part)
        if not cpus:
            raise UserError(f"socket {index} in {spec!r} has no CPUs")
        missing = sorted(set(cpus) - available)
        if missing:
            raise UserError(f"socket {index} in {spec!r} uses CPUs {missing} that this process cannot run on "
                            f"(available: {sorted(available)})")
        if seen & set(cpus):
            raise UserError(f"sockets in {spec!r} share CPUs {sorted(seen & set(cpus))}")
        seen |= set(cpus)
        sockets.append(Socket(index, cpus))
    return Topology(tuple(sockets), detect_gpus(), source=f"override {spec!r}")


def detect(nodes_dir: Path = SYSFS_NODES) -> Topology:
    """NUMA nodes from sysfs (restricted to the CPUs this process may use); one socket if none."""
    available = set(os.sched_getaffinity(0))
    sockets = []
    for node_dir in sorted(nodes_dir.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpus = tuple(c for c in parse_cpu_list((node_dir / "cpulist").read_text()) if c in available)
        if cpus:
            sockets.append(Socket(len(sockets), cpus, _node_memory(node_dir), int(node_dir.name[4:])))
    if not sockets:
        return Topology((Socket(0, tuple(sorted(available))),), detect_gpus(), source="affinity (no sysfs NUMA)")
    return Topology(tuple(sockets), detect_gpus())


def _node_memory(node_dir: Path) -> int | None:
    try:
        text = (node_dir / "meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"MemTotal:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else None


def detect_gpus() -> tuple[str, ...]:
    try:
        import torch

        if torch.cuda.is_available():
            return tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # a broken CUDA install must not stop a CPU-only engine
        pass
    return ()
