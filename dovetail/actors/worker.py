"""What the draft and target-shard actors share: pinning, and a message loop on a zmq channel.

The loop runs in a daemon thread, so the actor's Ray methods (``ready``, ``ping``) still answer
while it works. A handler's exception becomes an ``ErrorReport`` to the coordinator; a malformed
or unknown message is logged and dropped. Neither stops the loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from dovetail.decode import freeze_loaded_heap
from dovetail.models.tree import DraftTree, TreeShape
from dovetail.models.lm_proposer import DraftVocab
from dovetail.models.spec import ModelSpec
from dovetail.protocol.channel import Channel
from dovetail.protocol.messages import PROTOCOL_VERSION, ArrayRef, EndRequest, ErrorReport, Shutdown, Sync, Synced
from dovetail.protocol.shm import ArenaReader, ShmArena

log = logging.getLogger("dovetail.actors")


@dataclass(frozen=True)
class ShardSpec:
    """What one target shard starts from (plain fields: it crosses a process boundary)."""

    model: ModelSpec
    rank: int
    world_size: int
    cpus: tuple[int, ...]
    numa_node: int | None
    group: str  # the shared-memory segment (collective "shm") or gloo's rendezvous file
    address: str  # the coordinator's zmq socket
    kernel: str = "mm"
    collective: str = "shm"
    features: bool = False  # hand the committed positions' features to a feature drafter (rank 0 sends them)
    max_batch: int = 1  # requests verified together (rank 0 keeps room for as many prompts' features)


@dataclass(frozen=True)
class DraftSpec:
    """What the draft worker starts from."""

    tree: TreeShape
    device: str  # "cuda" or "cpu"
    cpus: tuple[int, ...]
    address: str
    model: ModelSpec | None = None  # a draft model (fp32 for a GPU: the kernels are CPU ones)
    vocab: DraftVocab | None = None
    drafter_dir: str | None = None  # or a Dovetail feature drafter,
    target_float_weights: str | None = None  # whose embedding and head are the target's
    draft_vocab: int = 0
    drafter_precision: str = "int8"

def current_node() -> str:
    """The Ray node this process runs on (its id)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def on_node(node_id: str) -> dict:
    """Actor options that keep an actor on ``node_id``: an engine's actors share shared memory,
    ipc sockets and the topology its plan was made from, so they must share a node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


_SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237}
_MPOL_PREFERRED = 1


def pin_to(cpus: tuple[int, ...], numa_node: int | None) -> str:
    """Pin this process to ``cpus``, size torch's thread pool to them and, on a real NUMA node,
    prefer that node's memory (first touch after pinning does the rest). Returns what was done."""
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    if numa_node is None:
        return "first-touch"
    number = _SYS_SET_MEMPOLICY.get(os.uname().machine)
    if number is None:
        return "first-touch (no set_mempolicy on this architecture)"
    mask = ctypes.c_ulong(1 << numa_node)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, _MPOL_PREFERRED, ctypes.byref(mask), ctypes.sizeof(mask) * 8 + 1) != 0:
        return f"first-touch (set_mempolicy failed: errno {ctypes.get_errno()})"
    return f"preferred NUMA node {numa_node}"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@contextlib.contextmanager
def lean_loading():
    """Load weights with large allocations served straight by mmap, then go back to the heap.

    Loading slice by slice otherwise leaves ~0.4 GiB of freed-but-kept heap per 1.5B shard; but
    mmap for every activation afterwards costs ~15% of step time, so the threshold is raised again
    once the weights are in, together with the trim threshold: a fixed mmap threshold freezes
    glibc's trim threshold at 128 KiB, and trimming then re-faulting the heap each step costs ~7%."""
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 64 << 10)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def rss_bytes() -> int:
    """Peak resident memory of this process (VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def put_tree(arena: ShmArena, tree: DraftTree, scores: bool = False) -> dict:
    """A tree's arrays put in ``arena``, as the message fields that carry them: ``tokens``,
    ``parents``, for a sampled tree ``q_tokens`` and ``q_probs``, and with ``scores`` (the
    draft's answer; verification does not read them) its scores when it has them."""
    refs = {"tokens": arena.put(tree.tokens.astype(np.int32)), "parents": arena.put(tree.parents.astype(np.int32))}
    if tree.sampled:
        refs.update(q_tokens=arena.put(tree.q_tokens.astype(np.int32)), q_probs=arena.put(tree.q_probs))
    if scores and tree.scores is not None:
        refs.update(scores=arena.put(tree.scores))
    return refs


def read_tree(view, tokens: ArrayRef, parents: ArrayRef, q_tokens: ArrayRef | None = None,
              q_probs: ArrayRef | None = None, scores: ArrayRef | None = None) -> DraftTree:
    """The tree a message's references point at (``view`` reads one reference); the scores are
    copied out (they are read after the step, when the draft may have reused their memory)."""
    read = lambda ref: None if ref is None else view(ref)  # noqa: E731
    return DraftTree(view(tokens), view(parents), read(q_tokens), read(q_probs),
                     None if scores is None else np.array(view(scores)))


class ChannelWorker:
    """Base of the actors that serve the coordinator over one channel (subclasses fill ``handlers``)."""

    handlers: dict[type, str] = {}

    def _serve(self, address: str, name: str, setup=None) -> None:
        """Run ``setup()`` (loading, warm-up), then the message loop, in one thread of their own;
        return once setup is done (re-raising its error).

        All compute stays on that one thread: each thread that runs an OpenMP region gets its own
        thread team, and with two teams in a process libgomp stops spinning between regions
        (it counts more threads than CPUs), and every quantized kernel call runs about 3x slower."""
        self.channel = Channel(address, bind=False)
        self._arenas = ArenaReader()
        done, failure = threading.Event(), []

        def run():
            try:
                if setup is not None:
                    setup()
                freeze_loaded_heap()
            except BaseException as exc:  # handed to __init__, which raises it in Ray's thread
                failure.append(exc)
                return
            finally:
                done.set()
            self._loop()

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()
        done.wait()
        if failure:
            self.channel.close()
            raise failure[0]

    def ping(self) -> bool:
        return self._thread.is_alive()

    def common_info(self) -> dict:
        """What every worker's ``ready()`` reports (the coordinator checks the protocol version)."""
        return {"pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0)), "peak_rss": rss_bytes(),
                "protocol": PROTOCOL_VERSION, "node_id": current_node()}

    def release(self, request_id: str) -> None:
        """Free a finished request's state (subclasses drop its KV cache)."""

    def view(self, ref: ArrayRef):
        """A zero-copy read-only view of an array another process put in shared memory."""
        return self._arenas.view(ref)

    def _loop(self) -> None:
        while True:
            msg = self.channel.recv()
            if msg is None:
                continue  # malformed: already logged by the channel
            if isinstance(msg, Shutdown):
                break
            if isinstance(msg, EndRequest):
                self.release(msg.request_id)
                continue
            if isinstance(msg, Sync):
                self.channel.send(Synced(msg.token))
                continue
            handler = self.handlers.get(type(msg))
            if handler is None:
                log.error("%s: no handler for %s message, dropped", self._thread.name, msg.KIND)
                continue
            try:
                getattr(self, handler)(msg)
            except Exception as exc:  # report, never die: the coordinator decides what fails
                log.exception("%s failed on %s", self._thread.name, msg.KIND)
                for request_id in getattr(msg, "request_ids", None) or [getattr(msg, "request_id", "")]:
                    self.report(request_id, exc)
        self._close()

    def report(self, request_id: str, exc: Exception) -> None:
        """Tell the coordinator that ``request_id``'s computation failed here."""
        self.channel.send(ErrorReport(request_id, f"{type(exc).__name__}: {exc}"))

    def _close(self) -> None:
        self._arenas.close()
        self.channel.close()
