"""Driver side of the actor system: start (or join) Ray, plan placement, start the coordinator.

``ActorEngine`` is an ``Engine`` (``dovetail/engine.py``) like the in-process one, so the CLI, the
Python API and the server use either one unchanged.
"""

from __future__ import annotations

import atexit
import dataclasses
import platform
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import ray

from dovetail.actors.coordinator import Coordinator, WorkerSpec
from dovetail.actors.feed import Feed, Subscriber
from dovetail.actors.worker import current_node, on_node
from dovetail.batching import TYPICAL_REQUEST_TOKENS, bound, kv_cap
from dovetail.config import DEFAULT_TREE, drafter_vocab
from dovetail.speculation import Proposers, SpeculationSetup, stats_depth, tree_room
from dovetail.engine import Generates
from dovetail.errors import UserError
from dovetail.request import Request, check_request
from dovetail.models.lm_proposer import DraftVocab
from dovetail.models.spec import ModelSpec
from dovetail.placement import MiB, Plan, drafter_bytes, kv_budget, kv_bytes_per_token, make_plan, model_bytes
from dovetail.protocol.shm import owned_name, remove_orphaned_segments, remove_orphans
from dovetail.describe import with_weights
from dovetail.store import dovetail_home, float_weights
from dovetail.topology import Topology, detect, parse_sockets

log = logging.getLogger("dovetail")

# ray and zmq put sockets under these dirs, and unix socket paths max out at 107 bytes; ray's own
# part is the longest, "/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store": 64 with a 7-digit pid
UNIX_PATH_ROOM = 107 - 64


def short_dir(name: str) -> Path:
    """``$DOVETAIL_HOME/name``, or a /tmp path when that is too long to hold unix sockets; made
    private to this user (see ``private_dir``)."""
    path = dovetail_home() / name
    if len(str(path)) > UNIX_PATH_ROOM:
        path = Path("/tmp") / f"dovetail-{os.getuid()}-{name}"
    return private_dir(path)


# The shared-memory all-reduce publishes a slot with a plain store after writing it, which is only
# ordered on CPUs with total store order (x86); elsewhere it could read a half-written slot.
TSO_MACHINES = ("x86_64", "amd64", "i386", "i686")


def shm_or_gloo(collective: str, say=lambda msg: None) -> str:
    """``collective``, except ``shm`` on a CPU without x86's store ordering: gloo, with a warning."""

    if collective == "shm" and platform.machine().lower() not in TSO_MACHINES:
        log.warning("the shared-memory all-reduce needs x86 store ordering; this is %s: using gloo",
                    platform.machine())
        say(f"collective: gloo (shm needs x86 store ordering; this CPU is {platform.machine()})")
        return "gloo"
    return collective


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter (0700): the zmq ipc sockets and Ray's
    files inside are then unreachable to other local users. A directory that another user owns
    (say, planted in /tmp beforehand) is refused."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if path.is_symlink() or info.st_uid != os.getuid():
        raise UserError(f"{path} belongs to another user (uid {info.st_uid}) or is a symlink; refusing to use it "
                        "for Dovetail's sockets (remove it, or set DOVETAIL_HOME)")
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


NODE_SOCKETS_ENV = "DOVETAIL_SOCKETS"  # a node's own sockets override, from the environment of its `ray start`


def resolve_topology(sockets: str | None, part: tuple[int, int] = (0, 1)) -> Topology:
    """This node (or its ``--sockets`` override, else its ``DOVETAIL_SOCKETS``), or this
    replica's ``part`` (index, count) of it."""
    sockets = sockets or os.environ.get(NODE_SOCKETS_ENV)
    return (parse_sockets(sockets) if sockets else detect()).partition(*part)


def loopback_ray() -> None:
    """Make a Ray started from this process listen on loopback only.

    Ray turns a loopback ``_node_ip_address`` into the machine's routable address, and its GCS,
    raylet, agents and workers then listen on every interface. Ray's own single-machine mode (the
    one it uses where clusters are unsupported) keeps the node on 127.0.0.1, and every one of those
    servers then binds loopback. The flag is read at Ray's import here and from the environment by
    the processes Ray starts; ``tests/test_serve.py`` checks the listeners with ``ss``."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def start_ray(address: str | None, topology: Topology) -> bool:
    """Start a local, loopback-only Ray (no dashboard, temp dir under the cache) or join
    ``address``; return whether this call connected (and so should disconnect at shutdown)."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        loopback_ray()
        ray.init(num_cpus=len(topology.cpus), num_gpus=len(topology.gpus), _temp_dir=str(short_dir("ray")), **kwargs)
    return True



class ActorEngine(Generates):
    def __init__(self, target: ModelSpec, draft: ModelSpec | None, config, vocab: DraftVocab | None = None,
                 say=lambda msg: None, partition: tuple[int, int] = (0, 1), setup: SpeculationSetup | None = None,
                 drafter_dir: Path | None = None):
        """``target`` and ``draft`` as the driver resolved them (``describe.describe_model``), or a
        Dovetail feature drafter in ``drafter_dir`` instead of a draft model. ``setup``: the
        model-free proposers and the cost model (default: the draft alone, with ``config``'s tree
        pinned, or chain:3)."""
        self.config, self.context_length = config, target.context_length
        self._feeds: Subscriber | None = None
        topology = resolve_topology(config.sockets, partition)
        self.target_precision = target.precision
        self.draft_precision = draft.precision if draft is not None else config.draft_precision
        draft_bytes = None
        if drafter_dir is not None:  # its layers + the target's embedding and head
            draft_bytes = drafter_bytes(drafter_dir, target.folder)
        elif draft is not None:
            draft_bytes = model_bytes(draft.folder, draft.precision)
        try:
            self.plan: Plan = make_plan(topology, model_bytes(target.folder, target.precision), draft_bytes,
                                        config.shards, draft_cpus=config.draft_cpus)
        except UserError as exc:  # on a cluster, say which machine could not hold it
            raise UserError(f"on node {platform.node()}: {exc}") from None
        # the weights every worker loads from are made once, here, not by every shard
        target = with_weights(target)
        if draft is not None and self.plan.draft.device == "cuda":  # fp32 weights, bf16 there
            draft = dataclasses.replace(draft, precision="fp32")
        draft = with_weights(draft) if draft is not None else None
        target_float = str(float_weights(target.folder)) if drafter_dir is not None else None
        say(self.plan.describe())
        # KV admission: the RAM each token of a request holds in the target (and a CPU draft)
        self.kv_bytes_per_token = kv_bytes_per_token(target.folder) + (
            kv_bytes_per_token(draft.folder) if draft is not None and self.plan.draft.device == "cpu" else 0)
        self.kv_budget_bytes = (config.kv_memory_mb * MiB if config.kv_memory_mb
                                else kv_budget(self.plan, partition[1]))
        # betting needs the draft and the target to run at once: not when they take turns on the same CPUs
        self.pipeline = config.pipeline and not (self.plan.draft and self.plan.draft.shares_cpus)
        self._owns_ray = start_ray(config.address, topology)
        self.node_id = current_node()  # the plan is this node's: all the engine's actors go here
        runs = short_dir("run")
        remove_orphans(runs, "", lambda path: shutil.rmtree(path, ignore_errors=True))  # of killed engines
        self.run_dir = private_dir(runs / owned_name(""))
        self._feeds = Subscriber(self.run_dir)  # where the coordinator pushes this process's requests' events
        self.setup = setup or SpeculationSetup(shape=config.tree or DEFAULT_TREE)
        has_draft = draft is not None or drafter_dir is not None
        self.tree_room = tree_room(Proposers("model" if has_draft else None, self.setup.text), self.setup.shape)
        # the batch: as given, or "auto", which the coordinator resolves on the measured curve within
        # the requests of a typical size the KV budget holds; until then it is at most ``most``
        kv = kv_cap(self.kv_budget_bytes, self.kv_bytes(min(TYPICAL_REQUEST_TOKENS, self.context_length), 0))
        most = bound(config.max_batch, kv)
        spec = WorkerSpec(self.plan, target, draft, self.setup.shape or DEFAULT_TREE,
                          config.target_kernel, vocab, str(self.run_dir), shm_or_gloo(config.collective, say),
                          drafter_dir=str(drafter_dir) if drafter_dir is not None else None,
                          target_float_weights=target_float, draft_vocab=drafter_vocab(config),
                          draft_precision=config.draft_precision, gpu_share=1.0 / partition[1],
                          max_batch=config.max_batch, kv_cap=kv, prefill_chunk=config.prefill_chunk,
                          node_id=self.node_id,
                          text_proposers=tuple(self.setup.text), combined=self.setup.combined,
                          pinned_tree=self.setup.shape is not None, cost_key=self.setup.cost_key)
        # one thread per request in the batch relays its tokens (+2: one waiting to join, shutdown)
        coordinator_actor = ray.remote(num_cpus=0, max_restarts=-1, concurrency_groups={"control": 1},
                                       max_concurrency=most + 2, **on_node(self.node_id))(Coordinator)
        self.coordinator = coordinator_actor.remote(spec)
        self.info = ray.get(self.coordinator.info.remote())
        self.max_batch = self.info["max_batch"]  # what the coordinator resolved (admission follows it)
        for name, worker in self.info["workers"].items():
            say(f"{name}: pid {worker['pid']}, CPUs {worker['cpus']}, peak RSS {worker['peak_rss'] / 2**30:.2f} GiB")
        atexit.register(self.shutdown)

    @property
    def depth(self) -> int:
        return stats_depth(self.setup.shape) if (self.plan.draft or self.setup.text) else 0

    def kv_bytes(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """A request's worst-case KV cache: every position it can reach, plus the largest tree."""
        return (prompt_tokens + max_new_tokens + self.tree_room) * self.kv_bytes_per_token

    def kv_room(self, prompt_tokens: int) -> int:
        """The most new tokens a request with this prompt may ask for within the KV budget."""
        if not self.kv_bytes_per_token:
            return self.context_length
        return (self.kv_budget_bytes - self.kv_bytes(prompt_tokens, 0)) // self.kv_bytes_per_token

    def check_kv(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """``UserError`` when the request could never fit the KV budget, even alone."""
        need = self.kv_bytes(prompt_tokens, max_new_tokens)
        if need > self.kv_budget_bytes:
            raise UserError(f"this request may need {need / MiB:.1f} MiB of KV cache ({prompt_tokens} prompt + "
                            f"{max_new_tokens} new tokens) but the engine's KV budget is "
                            f"{self.kv_budget_bytes / MiB:.1f} MiB: ask for fewer tokens, or raise --kv-memory-mb")

    def submit(self, request: Request) -> Feed:
        """Start a request; its events: ``Tokens`` per step, then ``Finished`` or ``Failed``.
        ``cancel(request.request_id)`` stops it."""
        check_request(request.prompt_ids, request.max_new_tokens, self.context_length)
        self.check_kv(len(request.prompt_ids), min(request.max_new_tokens, self.context_length - len(request.prompt_ids)))
        pipeline = self.pipeline if request.pipeline is None else request.pipeline
        request = dataclasses.replace(request, prompt_ids=[int(t) for t in request.prompt_ids],
                                      params=request.params.seeded(), pipeline=pipeline)
        feed = self._feeds.open(request.request_id)
        guard = self.coordinator.run.remote(request, self._feeds.address)
        guard.future().add_done_callback(lambda done: done.exception() is not None and feed.fail(done.exception()))
        return feed


    def cancel(self, request_id: str) -> None:
        """Stop a request after its current step; its workers free its KV caches."""
        self.coordinator.cancel.remote(request_id)

    def close(self) -> None:
        self.shutdown()

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers and the coordinator; leave no shared memory or sockets behind.

        ``graceful=False`` (Ctrl-C) kills the coordinator at once: Ray then kills the workers it
        owns, and their shared-memory segments are swept once their processes are gone."""
        if getattr(self, "coordinator", None) is None:
            return
        atexit.unregister(self.shutdown)
        if graceful:
            try:
                ray.get(self.coordinator.shutdown.remote(), timeout=30)
            except Exception as exc:  # stuck or dead: killing it takes its workers along
                print(f"[dovetail] coordinator did not stop cleanly ({type(exc).__name__}); killing it",
                      file=sys.stderr)
        try:
            workers = ray.get(self.coordinator.info.remote(), timeout=5)["workers"]
        except Exception:
            workers = self.info["workers"]
        try:
            ray.kill(self.coordinator, no_restart=True)
        except Exception:
            pass
        self.coordinator = None
        if self._feeds is not None:
            self._feeds.close()
        _wait_for_exit([w["pid"] for w in workers.values()], timeout_s=10)
        if self._owns_ray:
            ray.shutdown()
        remove_orphaned_segments()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _wait_for_exit(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
