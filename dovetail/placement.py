"""Placement plan: which actor runs where (CPUs, GPU, threads, memory), checked before any load.

    topology = parse_sockets("0|1") or detect()
    plan = make_plan(topology, target_bytes, draft_bytes, shards=None)   # one shard per socket
    print(plan.describe())

Without a GPU the draft gets one core of its own, taken from the largest socket when that socket
has at least ``CARVE_MIN_CPUS`` (so the draft and the target can work at the same time at a small
cost to the target); otherwise it shares the CPUs of the last shard and they take turns, and the
plan says so. Impossible plans (more shards than cores, a
model that does not fit the RAM) raise ``UserError`` naming the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dovetail.errors import UserError
from dovetail.topology import Socket, Topology, parse_cpu_list

GiB, MiB = 1 << 30, 1 << 20
PROCESS_OVERHEAD = int(0.6 * GiB)  # torch + ray worker baseline per actor process
# Carve a draft core only from a socket this big: on 2 cores, taking one from the target slows
# verification more than overlapping the draft gains (bench/results/actors.json has both plans);
# from 4 cores the target keeps >= 3/4 of its socket.
CARVE_MIN_CPUS = 4
# Keep one core off the target for the processes that wake on every step (the coordinator, the
# server's replica and proxy) only on a socket this big: on fewer cores the target needs them all,
# and those processes then take their turn on the target's cores.
CONTROL_MIN_CPUS = 8
KV_VALUE_BYTES = 4  # keys and values are kept in fp32
KV_SHARE_OF_FREE = 0.8  # of the RAM a plan leaves free: the rest is headroom for activations and the OS


@dataclass(frozen=True)
class ShardPlacement:
    rank: int
    cpus: tuple[int, ...]
    numa_node: int | None
    memory_bytes: int


@dataclass(frozen=True)
class DraftPlacement:
    device: str  # "cuda" or "cpu"
    cpus: tuple[int, ...]
    shares_cpus: bool
    memory_bytes: int


@dataclass(frozen=True)
class Plan:
    shards: tuple[ShardPlacement, ...]
    draft: DraftPlacement | None
    topology: Topology
    free_bytes: int = 0  # RAM the plan leaves free when it was made (before any load)
    control_cpus: tuple[int, ...] = ()  # the coordinator's and the server's (none: they float)

    def describe(self) -> str:
        lines = [f"placement plan ({self.topology.source}; {len(self.topology.sockets)} socket(s), "
                 f"GPUs: {', '.join(self.topology.gpus) or 'none'}):"]
        for s in self.shards:
            policy = f"NUMA node {s.numa_node} memory" if s.numa_node is not None else "first-touch memory"
            lines.append(f"  target shard {s.rank}/{len(self.shards)}: CPUs {_cpus(s.cpus)} ({len(s.cpus)} threads), "
                         f"{policy}, ~{s.memory_bytes / GiB:.1f} GiB")
        if self.draft is not None:
            d = self.draft
            where = "GPU 0" if d.device == "cuda" else f"CPUs {_cpus(d.cpus)} ({len(d.cpus)} threads)"
            share = ", shares its CPUs with the target (no overlap possible)" if d.shares_cpus else ""
            lines.append(f"  draft: {where}, ~{d.memory_bytes / GiB:.1f} GiB{share}")
        if self.control_cpus:
            lines.append(f"  coordinator and server: CPU {_cpus(self.control_cpus)}, kept off the target's cores")
        else:
            lines.append("  coordinator and server: no reserved CPU (they wait on sockets and wake once a step)")
        return "\n".join(lines)


def _cpus(cpus) -> str:
    return ",".join(map(str, cpus))


# resident bytes per fp32 byte of a float checkpoint, quantized on load (Q8_0: 34/128; Q4_K: 18/128)
_QUANTIZED_SHARE = {"int8": 0.28, "int4": 0.16}


def model_bytes(path: str | Path, precision: str = "auto") -> int:
    """Bytes of a model's weights once loaded at ``precision``: a GGUF at the size of its blocks
    repacked for the kernels (floats as fp32), fp32 at its float size (bf16/fp16 files count
    double), int8/int4 at a share."""
    from dovetail.models.precision import gguf_file, native_bytes

    path = Path(path)
    gguf = gguf_file(path)
    if gguf is not None and precision in ("auto", "native", "q4"):  # q4: at most the file's own blocks
        return native_bytes(gguf)
    if gguf is not None and not any(path.glob("*.safetensors")):  # its float conversion
        path = path / "fp32"
        if not path.is_dir():
            return 4 * gguf.stat().st_size  # ~ the fp32 size of 4-5 bit blocks, before converting
    total = 0
    for file in path.glob("*.safetensors"):
        total += file.stat().st_size
    config = (path / "config.json")
    if config.exists() and re.search(r'"(torch_)?dtype":\s*"(bfloat16|float16)"', config.read_text()):
        total *= 2
    return int(total * _QUANTIZED_SHARE.get(precision, 1.0))


def drafter_bytes(drafter_dir: str | Path, target_dir: str | Path) -> int:
    """A feature drafter's memory: its own layers plus fp32 copies of the target's embedding and
    LM head (rows x hidden each, read from the target's config)."""
    import json

    config = json.loads((Path(target_dir) / "config.json").read_text())
    return model_bytes(drafter_dir) + 2 * 4 * config["vocab_size"] * config["hidden_size"]


def available_memory() -> int:
    text = Path("/proc/meminfo").read_text()
    match = re.search(r"MemAvailable:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else 1 << 62


def make_plan(topology: Topology, target_bytes: int, draft_bytes: int | None, shards: int | None = None,
              draft_on_gpu: bool | None = None, memory_available: int | None = None,
              draft_cpus: str = "auto") -> Plan:
    """Shards over sockets (``shards`` defaults to one per socket; more shards split sockets evenly).

    ``draft_cpus`` (no GPU): "auto" carves one core for the draft from a socket of at least
    ``CARVE_MIN_CPUS`` (else shares), "shared" runs it on the last
    shard's CPUs (the draft and the target then take turns), or "4,5" gives it those CPUs."""
    groups = _shard_groups(topology.sockets, len(topology.sockets) if shards is None else shards)
    gpu = bool(topology.gpus) if draft_on_gpu is None else draft_on_gpu
    draft = None
    if draft_bytes is not None:
        if gpu:
            draft = DraftPlacement("cuda", (), False, draft_bytes)
        elif draft_cpus == "shared":
            draft = DraftPlacement("cpu", groups[-1][0], True, draft_bytes + PROCESS_OVERHEAD)
        elif draft_cpus != "auto":
            groups, draft = _reserve_draft_cpus(groups, parse_cpu_list(draft_cpus), draft_bytes)
        else:
            groups, draft = _carve_draft_cpu(groups, draft_bytes)
    groups, control = _carve_control_cpu(groups)
    n = len(groups)
    per_shard = target_bytes // n + PROCESS_OVERHEAD
    placed = tuple(ShardPlacement(i, cpus, node, per_shard) for i, (cpus, node, _) in enumerate(groups))
    available = memory_available if memory_available is not None else available_memory()
    need = _check_memory(placed, draft, groups, available)
    return Plan(placed, draft, topology, available - need, control)


def _shard_groups(sockets: tuple[Socket, ...], shards: int) -> list[tuple[tuple[int, ...], int | None, int | None]]:
    """(cpus, numa node, socket memory) per shard."""
    total_cpus = sum(len(s.cpus) for s in sockets)
    if shards < 1:
        raise UserError(f"need at least one target shard, got {shards}")
    if shards > total_cpus:
        raise UserError(f"{shards} target shards but only {total_cpus} CPU core(s): at most one shard per core")
    if shards <= len(sockets):
        return [(s.cpus, s.numa_node, s.memory_bytes) for s in sockets[:shards]]
    if shards % len(sockets):
        raise UserError(f"{shards} shards cannot be spread evenly over {len(sockets)} sockets")
    per = shards // len(sockets)
    groups = []
    for s in sockets:
        if len(s.cpus) < per:
            raise UserError(f"socket {s.index} has {len(s.cpus)} CPU(s), too few for {per} shards")
        size = len(s.cpus) // per
        for i in range(per):
            cpus = s.cpus[i * size:(i + 1) * size] if i < per - 1 else s.cpus[i * size:]
            groups.append((cpus, s.numa_node, s.memory_bytes // per if s.memory_bytes else None))
    return groups


def _carve_draft_cpu(groups, draft_bytes):
    """Give the draft the last CPU of the largest shard group when that group can spare one."""
    largest = max(range(len(groups)), key=lambda i: (len(groups[i][0]), i))
    cpus, node, mem = groups[largest]
    if len(cpus) >= CARVE_MIN_CPUS:
        groups = list(groups)
        groups[largest] = (cpus[:-1], node, mem)
        return groups, DraftPlacement("cpu", cpus[-1:], False, draft_bytes + PROCESS_OVERHEAD)
    return groups, DraftPlacement("cpu", groups[-1][0], True, draft_bytes + PROCESS_OVERHEAD)


def _carve_control_cpu(groups):
    """The last CPU of the first shard group, when that group can spare it (``CONTROL_MIN_CPUS``)."""
    cpus, node, mem = groups[0]
    if len(cpus) < CONTROL_MIN_CPUS:
        return groups, ()
    return [(cpus[:-1], node, mem), *groups[1:]], cpus[-1:]


def _reserve_draft_cpus(groups, cpus: tuple[int, ...], draft_bytes):
    known = {c for g in groups for c in g[0]}
    if not cpus or set(cpus) - known:
        raise UserError(f"draft CPUs {list(cpus)} must be among the planned CPUs {sorted(known)}")
    groups = [(tuple(c for c in g[0] if c not in cpus), g[1], g[2]) for g in groups]
    if any(not g[0] for g in groups):
        raise UserError(f"giving the draft CPUs {list(cpus)} leaves a target shard without CPUs")
    return groups, DraftPlacement("cpu", tuple(cpus), False, draft_bytes + PROCESS_OVERHEAD)


def _check_memory(shards, draft, groups, available: int) -> int:
    """The plan's RAM; ``UserError`` when the machine or a NUMA node cannot hold it."""
    need = sum(s.memory_bytes for s in shards) + (draft.memory_bytes if draft and draft.device == "cpu" else 0)
    if need > available:
        raise UserError(f"the plan needs ~{need / GiB:.1f} GiB of RAM but only {available / GiB:.1f} GiB is available: "
                        f"use a smaller model or a machine with more memory")
    for shard, (_, _, socket_mem) in zip(shards, groups):
        if socket_mem and shard.memory_bytes > socket_mem:
            raise UserError(f"target shard {shard.rank} needs ~{shard.memory_bytes / GiB:.1f} GiB but its NUMA node "
                            f"has {socket_mem / GiB:.1f} GiB: use more shards")
    return need


def kv_bytes_per_token(model_dir: str | Path) -> int:
    """RAM one token's keys and values take in every layer of the model in ``model_dir`` (0 when
    its config does not say)."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        kv_heads = config.get("num_key_value_heads") or heads
        return 2 * config["num_hidden_layers"] * kv_heads * head_dim * KV_VALUE_BYTES
    except (OSError, KeyError, TypeError, ValueError):
        return 0


def kv_budget(plan: Plan, share: int = 1) -> int:
    """Bytes of KV cache one engine may hold: its ``share`` of the RAM the plan leaves free, less headroom."""
    return int(max(plan.free_bytes, 0) * KV_SHARE_OF_FREE) // share
