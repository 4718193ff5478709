"""Coordinator actor: owns the draft and target-shard actors and runs requests through the loop.

Requests queue in arrival order; one scheduler thread admits up to ``max_batch`` of them and steps
them together through ``dovetail/decode.py``'s loop, with ``actors/remote.py``'s adapters turning
its calls into messages (``ProposeTree``/``ProposeBatch``, ``Predraft`` for bets, ``VerifyTree``/
``VerifyBatch``). A request's ``run`` call pushes what the scheduler produces for it to the process that
submitted it (``actors/feed.py``) and returns its last event.

Pipelined (betting) step::

    shards  <- VerifyTree(tree k)            | draft <- Predraft: bet that tree k's greedy path
    acc     <- shard 0 (Accepted)            |   is accepted + its own bonus guess, grow tree k+1
    bet     <- draft (TreeProposal, guess)   |
    acc.tokens == bet.guess ? tree k+1 = bet.tree (draft time hidden behind verification)
                            : tree k+1 <- draft ProposeTree(acc.tokens) (bet discarded, redraft)

Failures (``actors/messaging.py`` tells them apart): a request's own ends that request alone, its
state freed in every worker, and every worker's message loop must answer a ``Sync``; a worker's
(gone or stuck) kills and restarts the whole group (collectives cannot lose a member), and the
requests in flight fail.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import zmq

from dovetail.actors.feed import Publisher
from dovetail.actors.messaging import SEND_TIMEOUT_MS, Inbox, Messaging, WorkerFailure
from dovetail.actors.remote import DraftTurns, RemoteProposer, RemoteVerifier
from dovetail.batching import bound, resolve
from dovetail.decode import PREFILL_CHUNK, DecodeLoop, freeze_loaded_heap
from dovetail.models.lm_proposer import DraftVocab
from dovetail.models.spec import ModelSpec
from dovetail.models.tree import TreeShape
from dovetail.placement import Plan
from dovetail.protocol.channel import Channel, PeerUnavailable, ipc_address
from dovetail.protocol.collectives import shm_collective_bytes
from dovetail.protocol.messages import PROTOCOL_VERSION, Shutdown
from dovetail.protocol.shm import ArenaReader, ShmArena, pid_alive, remove_orphaned_segments
from dovetail.speculation import SpeculationSetup, build_speculator
from dovetail.request import Failed, Finished, Request

log = logging.getLogger("dovetail.coordinator")

CANCEL_MEMORY_S = 600.0  # how long a cancellation for a request not (yet) seen here is remembered
# Workers that take turns on the same CPUs: OpenMP threads of the one that just finished would
# otherwise spin (libgomp's default, 300k pause loops: milliseconds) on the cores the other one now
# needs. This shorter spin still covers the gaps between one forward's kernels.
TAKING_TURNS_SPINCOUNT = 10_000


@dataclass(frozen=True)
class WorkerSpec:
    """What the coordinator needs to (re)start its workers."""

    plan: Plan
    target: ModelSpec  # resolved once by the driver: precision, weights, EOS, context
    draft: ModelSpec | None  # a draft model, as its worker loads it
    tree: TreeShape
    target_kernel: str = "mm"
    vocab: DraftVocab | None = None  # the draft's ids it may not propose
    run_dir: str = "/tmp/dovetail-run"
    collective: str = "shm"  # how shards all-reduce: "shm" (shared memory) or "gloo"
    drafter_dir: str | None = None  # a Dovetail feature drafter instead of a draft model: shards send it features
    target_float_weights: str | None = None  # the drafter's embedding and head come from these
    draft_vocab: int = 0
    draft_precision: str = "int8"  # the feature drafter's (fp32 or its own int8)
    gpu_share: float = 1.0  # of the GPU the draft asks Ray for (serving replicas share one GPU)
    max_batch: int | str = 1  # > 1: up to this many requests decode together, in one forward; "auto": see batching
    kv_cap: int | None = None  # "auto": at most the requests of a typical size the KV budget holds
    prefill_chunk: int = PREFILL_CHUNK  # a prompt joining running requests is prefilled this many tokens per step
    step_timeout_s: float = 600.0  # a reply (prefill included) not back by then fails its request
    node_id: str | None = None  # the Ray node every worker runs on (the engine's; its topology made the plan)
    text_proposers: tuple[str, ...] = ()  # model-free proposers, run here in the loop (no actor, no CPUs)
    combined: bool = True  # their trees (and the draft's) merge every step; False: one is chosen per step
    pinned_tree: bool = True  # ``tree`` every step; False: the cost model picks the depth (or none)
    cost_key: dict | None = None  # the measured cost curve's cache key

    @property
    def feature_drafter(self) -> bool:
        return self.drafter_dir is not None

    @property
    def has_draft(self) -> bool:
        return self.draft is not None or self.drafter_dir is not None


@dataclass(eq=False)
class _Waiting:
    """A request, where its events go, and the end its ``run`` call waits for."""

    request: Request
    push: Callable[[object], None]
    ended: threading.Event
    last: object = None

    def emit(self, event) -> None:
        """Push one event; the last one (stamped with the worker group's generation, which counts
        restarts) also ends the ``run`` call."""
        if isinstance(event, (Finished, Failed)):
            self.last = event
        self.push(event)
        if self.last is not None:
            self.ended.set()


class Coordinator(Messaging):
    """The actor: a scheduler thread steps the batch through the loop, whose adapters
    (``actors/remote.py``) send and receive through it (it is their ``Link``)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        if spec.plan.control_cpus:  # it wakes every step: off the target's cores when the plan keeps one
            os.sched_setaffinity(0, spec.plan.control_cpus)
        self.generation = 0
        self.run_dir = Path(spec.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # made private by the driver (system.py)
        self.arena = ShmArena(1 << 20)  # prompts, root-only trees
        self.workers_info: dict = {}
        self._cancelled: dict[str, float] = {}  # request id -> when cancel() was called
        self._failures: dict[str, str] = {}  # request id -> the error a worker reported for it
        self._restarting = False
        self._lifecycle = threading.RLock()  # one worker-group restart at a time, from any thread
        self._inflight: set[str] = set()  # requests between run()'s start and end
        self.feeds = Publisher()  # events to the processes that submitted the requests
        self._start_workers()
        self.views = ArenaReader()  # the draft's trees, read from its arena
        takes_turns = bool(spec.plan.draft and spec.plan.draft.shares_cpus)  # draft and target on the same CPUs
        turns = DraftTurns(self) if takes_turns and spec.has_draft else None
        verifier = RemoteVerifier(self, turns)
        setup = SpeculationSetup(spec.text_proposers, spec.combined, spec.tree if spec.pinned_tree else None,
                                 spec.cost_key, log.warning)
        context = spec.target.context_length
        speculator = build_speculator(RemoteProposer(self, turns) if spec.has_draft else None, setup, verifier,
                                      context, reads_features=spec.feature_drafter, bets=True)
        # after the cost model's measurement: "auto" reads the same cached curve
        self.batch = resolve(spec.max_batch, verifier, context, spec.cost_key, spec.kv_cap, log.warning)
        self.loop = DecodeLoop(speculator, verifier,
                               spec.target.eos_token_ids, context, self.batch.size, cancelled=self._cancelled,
                               on_failure=self._fail_request,
                               prefill_together=not takes_turns,
                               prefill_chunk=spec.prefill_chunk)
        self._incoming: queue.Queue = queue.Queue()  # requests waiting to join the batch
        self._stopping = threading.Event()
        self._scheduler = threading.Thread(target=self._serve, name="scheduler", daemon=True)
        freeze_loaded_heap()
        self._scheduler.start()

    # -- worker lifecycle --------------------------------------------------------------------
    def _start_workers(self) -> None:
        from dovetail.actors.draft_worker import DraftWorker
        from dovetail.actors.target_shard import TargetShard
        from dovetail.actors.worker import DraftSpec, ShardSpec, on_node

        self.generation += 1
        spec, plan, gen = self.spec, self.spec.plan, self.generation
        env_vars = {"GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
        if plan.draft is not None and plan.draft.shares_cpus:
            env_vars["GOMP_SPINCOUNT"] = str(TAKING_TURNS_SPINCOUNT)
        env = {"runtime_env": {"env_vars": env_vars}, **(on_node(spec.node_id) if spec.node_id else {})}
        group = str(self.run_dir / f"gloo-{gen}-{secrets.token_hex(3)}")
        self.group_arena = None
        if spec.collective == "shm" and len(plan.shards) > 1:
            self.group_arena = ShmArena(shm_collective_bytes(len(plan.shards)))
            group = self.group_arena.name
        self.shards: list[Inbox] = []
        for shard in plan.shards:
            address = ipc_address(self.run_dir, f"shard{shard.rank}-{gen}")
            channel = Channel(address, bind=True, send_timeout_ms=SEND_TIMEOUT_MS)
            actor = ray.remote(TargetShard).options(num_cpus=0, max_restarts=0, **env).remote(ShardSpec(
                spec.target, shard.rank, len(plan.shards), shard.cpus, shard.numa_node, group, address,
                spec.target_kernel, spec.collective, spec.feature_drafter, bound(spec.max_batch, spec.kv_cap)))
            self.shards.append(Inbox(f"target shard {shard.rank}", channel, actor))
        self.draft: Inbox | None = None
        if plan.draft is not None and spec.has_draft:
            address = ipc_address(self.run_dir, f"draft-{gen}")
            channel = Channel(address, bind=True, send_timeout_ms=SEND_TIMEOUT_MS)
            d = plan.draft
            actor = ray.remote(DraftWorker).options(num_cpus=0, num_gpus=spec.gpu_share if d.device == "cuda" else 0,
                                                     max_restarts=0, **env).remote(DraftSpec(
                spec.tree, d.device, d.cpus, address, spec.draft, spec.vocab, spec.drafter_dir,
                spec.target_float_weights, spec.draft_vocab, spec.draft_precision))
            self.draft = Inbox("draft", channel, actor)
        inboxes = self._inboxes()
        infos = ray.get([box.actor.ready.remote() for box in inboxes])
        self.workers_info = {box.name: info for box, info in zip(inboxes, infos)}
        skewed = [f"{box.name} speaks {info.get('protocol')}" for box, info in zip(inboxes, infos)
                  if info.get("protocol") != PROTOCOL_VERSION]
        if skewed:
            raise RuntimeError(f"protocol version mismatch (coordinator: {PROTOCOL_VERSION}): {', '.join(skewed)}")
        self.poller = zmq.Poller()
        for box in inboxes:
            self.poller.register(box.channel.socket, zmq.POLLIN)

    def _stop_workers(self, graceful: bool) -> None:
        if graceful:
            for box in self._inboxes():
                try:
                    box.channel.send(Shutdown("coordinator stopping"))
                except PeerUnavailable:
                    pass  # gone already: killed below anyway
            time.sleep(0.3)  # let the loops close their arenas
        for box in self._inboxes():
            box.channel.close()
            ray.kill(box.actor, no_restart=True)
        self.shards, self.draft = [], None
        if self.group_arena is not None:
            self.group_arena.close()
            self.group_arena = None
        remove_orphaned_segments()

    def restart_workers(self) -> None:
        with self._lifecycle:
            self._restart_workers()

    def _restart_workers(self) -> None:
        self._restarting = True
        try:
            self._stop_workers(graceful=False)
            time.sleep(0.5)  # let the killed processes exit before their segments are swept
            remove_orphaned_segments()
            self._start_workers()
        finally:
            self._restarting = False

    @ray.method(concurrency_group="control")
    def info(self, refresh: bool = False) -> dict:
        """Plan and workers (pid, CPUs, peak RSS); ``refresh`` asks the workers again."""
        if refresh:
            boxes = self._inboxes()
            self.workers_info = dict(zip((b.name for b in boxes), ray.get([b.actor.ready.remote() for b in boxes])))
        return {"generation": self.generation, "workers": self.workers_info, "plan": self.spec.plan.describe(),
                "node_id": ray.get_runtime_context().get_node_id(), **self.batch.as_dict()}

    @ray.method(concurrency_group="control")
    def ping(self) -> bool:
        return True

    @ray.method(concurrency_group="control")
    def healthy(self) -> bool:
        """Whether requests can be served now: not restarting the workers, and every worker alive."""
        if self._restarting:
            return False
        dead = self._dead_workers(timeout_s=2.0)
        if dead and not self._inflight:
            self._restart_in_background(dead)
        return not dead

    def _restart_in_background(self, dead: list[str]) -> None:
        """Workers died while the engine was idle: replace them now. A balancer that trusts
        /health would otherwise never send the request that replaces them."""
        with self._lifecycle:
            if self._restarting:
                return
            self._restarting = True  # /health says 503 from now until the new group is up

        def restart():
            log.warning("%s died while idle; restarting the workers", ", ".join(dead))
            try:
                self.restart_workers()
            except Exception:  # the next request (or health check) tries again
                log.exception("restarting the workers failed")
                self._restarting = False

        threading.Thread(target=restart, name="worker-restart", daemon=True).start()

    @ray.method(concurrency_group="control")
    def cancel(self, request_id: str) -> None:
        """Stop ``request_id`` after its current step (or before it starts); its KV caches are freed."""
        now = time.monotonic()
        for rid, t in list(self._cancelled.items()):  # in place: the loop holds this dict
            if now - t >= CANCEL_MEMORY_S:
                self._cancelled.pop(rid, None)
        self._cancelled[request_id] = now

    def shutdown(self) -> None:
        self._stopping.set()
        self._scheduler.join(timeout=60)  # let it finish its step: stopping the workers under it would fail the step
        self._stop_workers(graceful=True)
        self.feeds.close()
        self.views.close()
        self.arena.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- requests ----------------------------------------------------------------------------
    def run(self, request: Request, feed_address: str):
        """Run the request, pushing its events to ``feed_address`` (``actors/feed.py``): ``Tokens``
        per step, then ``Finished`` or ``Failed``, which this call also returns when the request
        ends. After a worker failure the workers are restarted. ``cancel(request_id)`` stops it
        between steps."""
        self._inflight.add(request.request_id)
        waiting = _Waiting(request, self.feeds.emitter(feed_address, request.request_id), threading.Event())
        try:
            self._incoming.put(waiting)
            waiting.ended.wait()
            return waiting.last
        finally:
            self._inflight.discard(request.request_id)

    def _stamping(self, waiting: _Waiting):
        """The loop's ``emit`` for a request: its last event carries the worker group's generation."""
        def emit(event):
            if isinstance(event, (Finished, Failed)):
                event.generation = self.generation
            waiting.emit(event)
        return emit

    def _serve(self) -> None:
        """The scheduler thread: admit requests in arrival order, step the batch, until shutdown."""
        loop = self.loop
        while not self._stopping.is_set():
            try:
                self._admit(loop)
                if loop.live:
                    loop.step()
            except WorkerFailure as exc:
                loop.fail_all(self._recover(exc, [lv.rid for lv in loop.live]))
            except Exception as exc:  # a bug must not kill the scheduler: fail the batch, go on
                log.exception("batch step failed")
                request_ids = [lv.rid for lv in loop.live]
                loop.fail_all(f"request failed: {type(exc).__name__}: {exc}")
                for rid in request_ids:
                    self._quiet_after(rid)

    def _quiet_after(self, request_id: str) -> None:
        try:
            self._quiesce(request_id)
        except WorkerFailure as exc:
            self._recover(exc, [request_id])

    def _admit(self, loop: DecodeLoop) -> None:
        """Prefill waiting requests while the batch has room (block briefly only when idle)."""
        while loop.room > 0:
            try:
                waiting = self._incoming.get(timeout=0.2) if not loop.live else self._incoming.get_nowait()
            except queue.Empty:
                return
            if not loop.live:
                try:
                    self._recover_idle()
                except Exception as exc:  # the group could not be restarted: answer this request
                    waiting.emit(Failed(f"request failed: restarting the workers failed: {exc}", self.generation))
                    continue
            loop.admit(waiting.request, self._stamping(waiting))

    def _recover(self, exc: WorkerFailure, request_ids: list[str]) -> str:
        """After a worker failure: restart the whole group; the error message for the requests."""
        log.error("requests %s failed: %s; restarting the workers", request_ids, exc)
        message = f"request failed: {exc}"
        try:
            self.restart_workers()
            message += " (the workers were restarted; later requests run normally)"
        except Exception as restart_exc:  # keep the coordinator alive; the next request retries
            message += f" (restarting the workers failed too: {restart_exc})"
        return message

    def _fail_request(self, request_id: str, exc: Exception) -> str:
        """After one request's own failure (the others go on): its state is freed everywhere and
        every worker must answer; its error message. ``WorkerFailure`` if a worker is dead or stuck."""
        log.error("request %s failed: %s", request_id, exc)
        self._quiesce(request_id)
        return f"request failed: {exc}"

    def _recover_idle(self) -> None:
        """Before a request on an idle engine: replace workers that died meanwhile, so that the
        request runs normally (a pid check, microseconds: they share this node), and sweep the
        segments dead processes left (a killed coordinator's workers die after it restarted)."""
        with self._lifecycle:  # waits for a restart /health began
            gone = [name for name, info in self.workers_info.items() if not pid_alive(info["pid"])]
            if gone:
                log.warning("%s died while idle; restarting the workers", ", ".join(gone))
                self.restart_workers()
        remove_orphaned_segments()

