"""One typed configuration for an engine, validated where it enters (CLI, Python API)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dovetail.errors import UserError
from dovetail.models.fast_linear import KERNELS
from dovetail.models.loading import PRECISIONS, default_threads
from dovetail.models.tree import TreeShape
from dovetail.store import AUTO_DRAFT, DEFAULT_TARGET

# Chosen from bench/results (HumanEval, the packaged pair): verifying a few tokens costs little more
# than one target step, so a 4-token chain wins over wider trees, whose extra draft levels and
# verify rows cost more than they gain.
DEFAULT_TREE = TreeShape.chain(3)
ENGINES = ("actors", "inprocess", "auto")  # auto: see Dovetail.engine_kind
COLLECTIVES = ("shm", "gloo")


@dataclass
class EngineConfig:
    target: str = DEFAULT_TARGET
    draft: str | None = AUTO_DRAFT  # the trained drafter if any, else the 0.5B model; None: target-only
    tree: TreeShape = field(default_factory=lambda: DEFAULT_TREE)
    target_kernel: str = "mm"  # fp32 linears only
    target_precision: str = "auto"  # native GGUF blocks for a packaged model, fp32 for a float folder
    draft_precision: str = "auto"  # native GGUF blocks for a packaged model, int8 for a float folder
    draft_vocab: int = 0  # a Dovetail drafter's head cut to its corpus's N most frequent tokens (0: as trained)
    threads: int = field(default_factory=default_threads)  # in-process engine only (actors: the plan)
    engine: str = "actors"  # "actors": the Ray actor system; "inprocess": one process, no Ray
    sockets: str | None = None  # virtual sockets, e.g. "0|1" (default: the machine's NUMA nodes)
    shards: int | None = None  # target shards (default: one per socket)
    pipeline: bool = True  # draft the next block while the current one is verified
    address: str | None = None  # join this Ray cluster instead of starting one
    collective: str = "shm"  # how target shards all-reduce: "shm" (shared memory) or "gloo"
    draft_cpus: str = "auto"  # without a GPU: "auto" (a core of its own), "shared", or a CPU list
    max_batch: int = 1  # actor engine: requests decoding together, trees verified in one forward
    partition: tuple[int, int] = (0, 1)  # this engine's share of the machine: part i of n (one per replica)
    kv_memory_mb: int | None = None  # actor engine: KV-cache budget (default: 80% of the RAM the plan leaves free)

    def __post_init__(self):
        if isinstance(self.tree, str):
            self.tree = parse_tree(self.tree)
        if self.target_kernel not in KERNELS:
            raise UserError(f"target kernel must be one of {KERNELS}, got {self.target_kernel!r}")
        for role in ("target", "draft"):
            value = getattr(self, f"{role}_precision")
            if value not in PRECISIONS:
                raise UserError(f"{role} precision must be one of {PRECISIONS}, got {value!r}")
        if self.draft_vocab < 0:
            raise UserError(f"draft_vocab must be >= 0, got {self.draft_vocab}")
        if self.engine not in ENGINES:
            raise UserError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.draft_cpus not in ("auto", "shared"):
            from dovetail.topology import parse_cpu_list

            parse_cpu_list(self.draft_cpus)
        if self.collective not in COLLECTIVES:
            raise UserError(f"collective must be one of {COLLECTIVES}, got {self.collective!r}")
        if self.shards is not None and self.shards < 1:
            raise UserError(f"shards must be >= 1, got {self.shards}")
        if self.sockets is not None:
            from dovetail.topology import parse_sockets

            parse_sockets(self.sockets)
        if self.max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {self.max_batch}")
        index, count = self.partition
        if count < 1 or not 0 <= index < count:
            raise UserError(f"partition must be (index, count) with 0 <= index < count, got {self.partition}")
        if self.kv_memory_mb is not None and self.kv_memory_mb < 1:
            raise UserError(f"kv_memory_mb must be >= 1, got {self.kv_memory_mb}")
        if self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")


def parse_tree(text: str) -> TreeShape:
    try:
        return TreeShape.parse(text)
    except ValueError as exc:
        raise UserError(f"bad tree {text!r}: use TOTAL,DEPTH,TOP_K (e.g. 16,7,10) or chain:K ({exc})") from None
