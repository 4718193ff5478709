"""Coordinator actor: owns the draft and target-shard actors and runs each request's loop.

Per step (pipelined)::

    shards  <- VerifyTree(tree k)            | draft <- Predraft: bet that tree k's greedy path
    acc     <- shard 0 (Accepted)            |   is accepted + its own bonus guess, grow tree k+1
    bet     <- draft (TreeProposal, guess)   |
    acc.tokens == bet.guess ? tree k+1 = bet.tree (draft time hidden behind verification)
                            : tree k+1 <- draft ProposeTree(acc.tokens) (bet discarded, redraft)

With pipelining off the draft only ever gets ``ProposeTree``, after each verification.

Batching (``max_batch > 1``): requests queue in arrival order and up to ``max_batch`` decode
together in lockstep. Each step one ``ProposeBatch`` has the draft grow every live request's tree
together (one draft forward per tree level, each request against its own KV cache), then one
``VerifyBatch`` has the shards verify all the trees in one forward: either way the weights stream
once for all the requests. Requests join as others finish. No betting in this mode.

Failures come in two kinds:
* a request's own: a worker reports an error in that request's computation, a reply misses the
  step deadline, or a message cannot be encoded. That request alone ends with a clear error; its
  state is freed in every worker (``EndRequest``) and every worker's message loop must answer a
  ``Sync`` (proof that none is stuck, say in a collective); other requests go on.
* a worker's: one that is gone (fails a ping, its process died) or stuck (no ``Sync`` answer).
  The coordinator then kills and restarts every worker (a shard group cannot lose a member:
  collectives would hang), so the next request runs on a fresh group; requests in flight fail.
"""

from __future__ import annotations

import logging
import queue
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import zmq

from dovetail.engine import Failed, Finished, GenerationStats, OutputBuffer, Tokens
from dovetail.models.tree import TreeShape
from dovetail.protocol.collectives import shm_collective_bytes
from dovetail.placement import Plan
from dovetail.protocol.channel import Channel, PeerUnavailable, ipc_address
from dovetail.protocol.messages import (PROTOCOL_VERSION, Accepted, ArrayRef, EndRequest, ErrorReport, Predraft,
                                        ProposeBatch, ProposeTree, Shutdown, StartRequest, Sync, Synced, TreeProposal,
                                        VerifyBatch, VerifyTree)
from dovetail.protocol.shm import ShmArena, pid_alive, remove_orphaned_segments

log = logging.getLogger("dovetail.coordinator")

PING_EVERY_S = 1.0  # how long a reply may be silent before the coordinator checks the workers are alive
SYNC_DEADLINE_S = 30.0  # after a request failed: how long a worker may take to answer a Sync
SEND_TIMEOUT_MS = int(PING_EVERY_S * 1000)  # a send not taken by then: check the worker is alive
CANCEL_MEMORY_S = 600.0  # how long a cancellation for a request not (yet) seen here is remembered


class WorkerFailure(RuntimeError):
    """A draft or shard actor died or is stuck: the worker group must be restarted."""


class RequestFailure(RuntimeError):
    """One request's own computation failed; the workers are fine."""

    def __init__(self, request_id: str, message: str):
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class WorkerSpec:
    """What the coordinator needs to (re)start its workers."""

    plan: Plan
    target_dir: str
    draft_dir: str | None
    tree: TreeShape
    target_kernel: str = "mm"
    draft_precision: str = "auto"
    vocab_limit: int | None = None
    run_dir: str = "/tmp/dovetail-run"
    collective: str = "shm"  # how shards all-reduce: "shm" (shared memory) or "gloo"
    feature_drafter: bool = False  # draft_dir is a Dovetail drafter: shards send features, no betting
    draft_vocab: int = 0
    gpu_share: float = 1.0  # of the GPU the draft asks Ray for (serving replicas share one GPU)
    max_batch: int = 1  # > 1: up to this many requests decode together, their trees verified in one forward
    target_precision: str = "auto"
    step_timeout_s: float = 600.0  # a reply (prefill included) not back by then fails its request


@dataclass
class ActorStats(GenerationStats):
    """``GenerationStats`` plus where the time went in the actor system."""

    pipelined: bool = False
    bets: int = 0
    bets_held: int = 0
    draft_hidden_s: float = 0.0  # draft compute that ran while the shards verified, and was used
    draft_wait_s: float = 0.0  # coordinator blocked on the draft
    verify_wait_s: float = 0.0  # coordinator blocked on the shards
    protocol_s: float = 0.0  # waits not explained by compute: messages, wake-ups, copies
    bytes_draft_target: int = 0  # tree arrays + token ids between draft and target

    @property
    def overlap(self) -> float:
        """Share of draft compute hidden behind verification."""
        return self.draft_hidden_s / self.draft_s if self.draft_s > 0 else 0.0

    def to_dict(self, depth: int | None = None) -> dict:
        out = super().to_dict(depth)
        out["overlap"] = round(self.overlap, 4)
        out["bytes_per_token"] = round(self.bytes_draft_target / max(self.new_tokens, 1), 2)
        return out


@dataclass
class _Inbox:
    """A channel plus the messages that arrived while the coordinator waited on another one."""

    name: str
    channel: Channel
    actor: object
    pending: list = field(default_factory=list)


@dataclass(eq=False)
class _Request:
    """Batch mode: one request's inputs, progress, and the queue its ``generate`` call relays."""

    rid: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: dict
    speculate: bool
    items: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    stats: ActorStats = field(default_factory=ActorStats)
    out: OutputBuffer | None = None
    new_tokens: list[int] = field(default_factory=list)
    t0: float = 0.0


class Coordinator:
    def __init__(self, spec: WorkerSpec, eos_token_ids: list[int]):
        self.spec = spec
        self.eos = set(eos_token_ids)
        self.generation = 0
        self.run_dir = Path(spec.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # made private by the driver (system.py)
        self.arena = ShmArena(1 << 20)  # prompts
        self.workers_info: dict = {}
        self._cancelled: dict[str, float] = {}  # request id -> when cancel() was called
        self._failures: dict[str, str] = {}  # request id -> the error a worker reported for it
        self._restarting = False
        self._lifecycle = threading.RLock()  # one worker-group restart at a time, from any thread
        self._inflight: set[str] = set()  # requests between generate()'s start and end
        self._start_workers()
        self._incoming: queue.Queue = queue.Queue()  # batch mode: requests waiting to join the batch
        self._stopping = threading.Event()
        self._scheduler = None
        if spec.max_batch > 1:
            self._scheduler = threading.Thread(target=self._serve_batches, name="batch-scheduler", daemon=True)
            self._scheduler.start()

    # -- worker lifecycle --------------------------------------------------------------------
    def _start_workers(self) -> None:
        from dovetail.actors.draft_worker import DraftWorker
        from dovetail.actors.target_shard import TargetShard
        from dovetail.actors.worker import DraftSpec, ShardSpec

        self.generation += 1
        spec, plan, gen = self.spec, self.spec.plan, self.generation
        env = {"runtime_env": {"env_vars": {"GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}}}
        group = str(self.run_dir / f"gloo-{gen}-{secrets.token_hex(3)}")
        self.group_arena = None
        if spec.collective == "shm" and len(plan.shards) > 1:
            self.group_arena = ShmArena(shm_collective_bytes(len(plan.shards)))
            group = self.group_arena.name
        self.shards: list[_Inbox] = []
        for shard in plan.shards:
            address = ipc_address(self.run_dir, f"shard{shard.rank}-{gen}")
            channel = Channel(address, bind=True, send_timeout_ms=SEND_TIMEOUT_MS)
            actor = ray.remote(TargetShard).options(num_cpus=0, max_restarts=0, **env).remote(ShardSpec(
                spec.target_dir, shard.rank, len(plan.shards), shard.cpus, shard.numa_node, group, address,
                spec.target_kernel, spec.collective, spec.feature_drafter, spec.target_precision))
            self.shards.append(_Inbox(f"target shard {shard.rank}", channel, actor))
        self.draft: _Inbox | None = None
        if plan.draft is not None and spec.draft_dir is not None:
            address = ipc_address(self.run_dir, f"draft-{gen}")
            channel = Channel(address, bind=True, send_timeout_ms=SEND_TIMEOUT_MS)
            d = plan.draft
            actor = ray.remote(DraftWorker).options(num_cpus=0, num_gpus=spec.gpu_share if d.device == "cuda" else 0,
                                                     max_restarts=0, **env).remote(DraftSpec(
                spec.draft_dir, spec.tree, d.device, d.cpus, address, spec.draft_precision, spec.vocab_limit,
                spec.target_dir, spec.draft_vocab))
            self.draft = _Inbox("draft", channel, actor)
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

    def _inboxes(self) -> list[_Inbox]:
        return self.shards + ([self.draft] if self.draft else [])

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
        return {"generation": self.generation, "workers": self.workers_info, "plan": self.spec.plan.describe()}

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
        self._cancelled = {rid: t for rid, t in self._cancelled.items() if now - t < CANCEL_MEMORY_S}
        self._cancelled[request_id] = now

    def shutdown(self) -> None:
        self._stopping.set()
        if self._scheduler is not None:  # let it finish its step: stopping the workers under it would fail the step
            self._scheduler.join(timeout=60)
        self._stop_workers(graceful=True)
        self.arena.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- messaging ---------------------------------------------------------------------------
    def _send(self, box: _Inbox, msg) -> None:
        """Send to a worker; raise ``WorkerFailure`` when any worker has died instead of blocking."""
        while True:
            try:
                return box.channel.send(msg)
            except PeerUnavailable:
                self._check_alive()  # alive but slow to take it: try again

    def _recv(self, box: _Inbox, kind: type, request_id: str, step: int):
        """Wait for ``box``'s reply of type ``kind`` for this step. ``RequestFailure`` when a worker
        reported an error for this request or the step deadline passed; ``WorkerFailure`` when a
        worker died."""
        return self._wait(box, lambda m: isinstance(m, kind) and m.request_id == request_id and m.step == step,
                          f"{kind.KIND} (step {step})", request_id, self.spec.step_timeout_s)

    def _wait(self, box: _Inbox, match, what: str, request_id: str | None, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while True:
            if request_id is not None and request_id in self._failures:
                raise RequestFailure(request_id, self._failures.pop(request_id))
            for i, msg in enumerate(box.pending):
                if match(msg):
                    del box.pending[i]
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                if request_id is None:
                    raise WorkerFailure(f"{box.name} is stuck: no {what} within {timeout_s:g} s")
                raise RequestFailure(request_id, f"no {what} reply from {box.name} within {timeout_s:g} s")
            ready = dict(self.poller.poll(min(PING_EVERY_S, left) * 1000))
            if not ready:
                self._check_alive()
                continue
            for other in self._inboxes():
                if other.channel.socket in ready:
                    msg = other.channel.recv(timeout_ms=0)
                    if isinstance(msg, ErrorReport):
                        dead = self._dead_workers()  # a peer's death shows up as a collective's error
                        first_line = msg.error.splitlines()[0][:300] if msg.error else "an error"
                        if dead:
                            raise WorkerFailure(f"{', '.join(dead)} died: {other.name} reported {first_line}")
                        self._failures.setdefault(msg.request_id or request_id or "", f"{other.name}: {first_line}")
                    elif msg is not None:
                        other.pending.append(msg)

    def _quiesce(self, request_id: str) -> None:
        """After ``request_id`` failed: free its state in every worker, and make sure each worker's
        loop answers (``WorkerFailure`` if one does not); drop its stray replies."""
        token = secrets.token_hex(4)
        for box in self._inboxes():
            self._send(box, EndRequest(request_id))
            self._send(box, Sync(token))
        for box in self._inboxes():
            self._wait(box, lambda m: isinstance(m, Synced) and m.token == token, "Sync answer", None, SYNC_DEADLINE_S)
        for box in self._inboxes():
            box.pending = [m for m in box.pending if getattr(m, "request_id", None) != request_id]
        self._failures.pop(request_id, None)

    def _fail_request(self, request_id: str, exc: Exception) -> str:
        """End one failed request (the others go on); its error message. Restarts the workers only
        if one of them turns out dead or stuck."""
        log.error("request %s failed: %s", request_id, exc)
        message = f"request failed: {exc}"
        try:
            self._quiesce(request_id)
        except WorkerFailure as worker_exc:
            return self._recover(worker_exc, [request_id])
        return message

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

    def _check_alive(self) -> None:
        dead = self._dead_workers()
        if dead:
            raise WorkerFailure(f"{', '.join(dead)} died")

    def _dead_workers(self, timeout_s: float = 30.0) -> list[str]:
        """Names of the workers that are gone: no ping answer within ``timeout_s`` (the process
        died or is stuck), or a ping saying that its message loop has ended."""
        boxes = self._inboxes()
        pings = [box.actor.ping.remote() for box in boxes]
        deadline, dead = time.monotonic() + timeout_s, []
        for box, ref in zip(boxes, pings):
            try:
                alive = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.01))
            except Exception:
                alive = False
            if not alive:
                dead.append(box.name)
        return dead

    # -- the request loop --------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: dict, speculate: bool = True,
                 pipeline: bool = True, request_id: str | None = None):
        """Stream the request: ``Tokens`` per step, then ``Finished`` or ``Failed``. After an error the
        workers are restarted. ``cancel(request_id)`` stops it between steps."""
        request_id = request_id or secrets.token_hex(6)
        self._inflight.add(request_id)
        try:
            yield from self._generate(request_id, prompt_ids, max_new_tokens, sampling, speculate, pipeline)
        finally:
            self._inflight.discard(request_id)

    def _generate(self, request_id, prompt_ids, max_new_tokens, sampling, speculate, pipeline):
        if self.spec.max_batch > 1:
            yield from self._generate_batched(_Request(request_id, list(prompt_ids), max_new_tokens, sampling,
                                                       speculate))
            return
        chunks: list[list[int]] = []
        stats = ActorStats()
        try:
            for _ in self._run(request_id, prompt_ids, max_new_tokens, sampling, speculate, pipeline, stats, chunks):
                while chunks:
                    yield Tokens(chunks.pop(0))
            for box in self._inboxes():
                self._send(box, EndRequest(request_id))
            yield self._finished(stats, self._cancelled.pop(request_id, None) is not None)
        except WorkerFailure as exc:
            yield self._failed(self._recover(exc, [request_id]))
        except RequestFailure as exc:
            yield self._failed(self._fail_request(request_id, exc))
        except Exception as exc:  # e.g. a message that cannot be encoded: this request's problem alone
            log.exception("request %s failed in the coordinator", request_id)
            yield self._failed(self._fail_request(request_id, RuntimeError(f"{type(exc).__name__}: {exc}")))

    def _finished(self, stats: ActorStats, cancelled: bool) -> Finished:
        """A request's last item, with the worker group's generation (it counts restarts)."""
        return Finished(stats, cancelled, self.generation)

    def _failed(self, message: str) -> Failed:
        return Failed(message, self.generation)

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

    def _run(self, rid, prompt_ids, max_new_tokens, sampling, speculate, pipeline, stats: ActorStats, chunks):
        t0 = time.perf_counter()
        out = OutputBuffer(max_new_tokens, self.eos, chunks.append)
        if rid in self._cancelled:  # cancelled while it waited in a queue
            return
        self._recover_idle()
        draft = self.draft if speculate else None
        pipeline = bool(pipeline and draft and not self.spec.feature_drafter)  # a feature drafter does not bet
        stats.pipelined = pipeline
        start = StartRequest(rid, self.arena.put(np.asarray(prompt_ids, dtype=np.int32)), sampling)
        for box in self.shards + ([draft] if draft else []):
            self._send(box, start)
        first = self._recv(self.shards[0], Accepted, rid, 0)
        stats.prefill_s = time.perf_counter() - t0
        done = out.add(first.tokens)
        yield
        new_tokens, features, step, settled = first.tokens, first.features, 0, []
        tree = self._propose(draft, rid, step + 1, new_tokens, features, stats) if draft and not done else None
        while not done and rid not in self._cancelled:  # nothing is in flight here: safe to stop
            step += 1
            verify_msg = (VerifyTree(rid, step, tree.tokens, tree.parents) if draft
                          else VerifyTree(rid, step, *self._root_only(new_tokens[-1])))
            t_send = time.perf_counter()
            for box in self.shards:
                self._send(box, verify_msg)
            if pipeline:
                self._send(draft, Predraft(rid, step + 1, settled))
            acc = self._recv(self.shards[0], Accepted, rid, step)
            t_acc = time.perf_counter()
            stats.verify_wait_s += t_acc - t_send
            stats.verify_s += acc.compute_s
            stats.protocol_s += max(0.0, t_acc - t_send - acc.compute_s)
            stats.steps += 1
            stats.accepted_per_step.append(len(acc.path) - 1)
            stats.bytes_draft_target += 8 * len(acc.tokens)
            done = out.add(acc.tokens)
            yield
            new_tokens, features, settled = acc.tokens, acc.features, []
            if pipeline:
                bet = self._recv(draft, TreeProposal, rid, step + 1)
                wait = time.perf_counter() - t_acc
                stats.draft_wait_s += wait
                stats.draft_s += bet.compute_s
                stats.bets += 1
                if bet.guess == acc.tokens:
                    stats.bets_held += 1
                    stats.draft_hidden_s += max(0.0, bet.compute_s - wait)
                    stats.bytes_draft_target += self._tree_bytes(bet)
                    tree, settled = bet, acc.tokens
                    continue
            if not done and draft and rid not in self._cancelled:
                tree = self._propose(draft, rid, step + 1, new_tokens, features, stats)
        stats.new_tokens = len(out.tokens)
        stats.total_s = time.perf_counter() - t0

    # -- batch mode ----------------------------------------------------------------------------
    def _generate_batched(self, request: "_Request"):
        """The caller's side: queue the request, then relay what the scheduler produces for it."""
        self._incoming.put(request)
        while True:
            item = request.items.get()
            yield item
            if not isinstance(item, Tokens):
                return

    def _serve_batches(self) -> None:
        """The scheduler thread: admit requests in arrival order, step the batch, until shutdown."""
        active: list[_Request] = []
        while not self._stopping.is_set():
            try:
                self._admit(active)
                if active:
                    self._batch_step(active)
            except WorkerFailure as exc:
                message = self._recover(exc, [r.rid for r in active])
                for request in active:
                    request.items.put(self._failed(message))
                active.clear()
            except Exception as exc:  # a bug must not kill the scheduler: fail the batch, go on
                log.exception("batch step failed")
                for request in list(active):
                    self._fail_batched(request, active, RuntimeError(f"{type(exc).__name__}: {exc}"))

    def _fail_batched(self, request, active: list, exc: Exception) -> None:
        """One request of the batch failed: it alone ends (its state freed everywhere)."""
        if request in active:
            active.remove(request)
        try:
            message = self._fail_request(request.rid, exc)
        except Exception as other:  # the workers could not even be restarted: still answer the request
            message = f"request failed: {exc} (then: {other})"
        request.items.put(self._failed(message))

    def _admit(self, active: list) -> None:
        """Prefill waiting requests until the batch is full (block briefly only when idle)."""
        while len(active) < self.spec.max_batch:
            try:
                request = self._incoming.get(timeout=0.2) if not active else self._incoming.get_nowait()
            except queue.Empty:
                return
            if request.rid in self._cancelled:
                self._finish(request, active, cancelled=True)
                continue
            if not active:
                try:
                    self._recover_idle()
                except Exception as exc:  # the group could not be restarted: answer this request
                    request.items.put(self._failed(f"request failed: restarting the workers failed: {exc}"))
                    continue
            active.append(request)
            request.t0 = time.perf_counter()
            request.out = OutputBuffer(request.max_new_tokens, self.eos, lambda ids, q=request.items: q.put(Tokens(ids)))
            try:
                prompt = self.arena.put(np.asarray(request.prompt_ids, dtype=np.int32))
                for box in self.shards + ([self.draft] if self._drafts(request) else []):
                    self._send(box, StartRequest(request.rid, prompt, request.sampling))
                first = self._recv(self.shards[0], Accepted, request.rid, 0)
            except WorkerFailure:
                raise
            except Exception as exc:  # its own failure (or an unencodable message): only it ends
                self._fail_batched(request, active, exc)
                continue
            request.stats.prefill_s = time.perf_counter() - request.t0
            request.new_tokens = first.tokens
            if request.out.add(first.tokens):
                self._finish(request, active)

    def _drafts(self, request) -> bool:
        return bool(self.draft and request.speculate)

    def _batch_step(self, active: list) -> None:
        """Draft every live request's tree, verify them all in one forward, commit, finish."""
        for request in [r for r in active if r.rid in self._cancelled]:
            self._finish(request, active, cancelled=True)
        if not active:
            return
        step = {r.rid: r.stats.steps + 1 for r in active}
        t = time.perf_counter()
        drafting = [r for r in active if self._drafts(r)]
        if drafting:  # their trees grow together: one draft forward per level
            self._send(self.draft, ProposeBatch([r.rid for r in drafting], [step[r.rid] for r in drafting],
                                                 [r.new_tokens for r in drafting]))
        trees, failed = [], []
        for request in active:
            if self._drafts(request):
                try:
                    tree = self._recv(self.draft, TreeProposal, request.rid, step[request.rid])
                except RequestFailure as exc:
                    failed.append((request, exc))
                    continue
                request.stats.draft_s += tree.compute_s
                request.stats.bytes_draft_target += self._tree_bytes(tree) + 8 * len(request.new_tokens)
                trees.append((tree.tokens, tree.parents))
            else:
                trees.append(self._root_only(request.new_tokens[-1]))
        for request, exc in failed:
            self._fail_batched(request, active, exc)
        if not active:
            return
        t_send = time.perf_counter()
        for request in active:
            request.stats.draft_wait_s += t_send - t
        batch = VerifyBatch([r.rid for r in active], [step[r.rid] for r in active], [tk for tk, _ in trees],
                            [pa for _, pa in trees])
        for box in self.shards:
            self._send(box, batch)
        failed = []
        for request in list(active):
            try:
                acc = self._recv(self.shards[0], Accepted, request.rid, step[request.rid])
            except RequestFailure as exc:
                failed.append((request, exc))
                continue
            stats = request.stats
            stats.verify_wait_s += time.perf_counter() - t_send
            stats.verify_s += acc.compute_s / len(batch.request_ids)  # its share of the shared forward
            stats.steps += 1
            stats.accepted_per_step.append(len(acc.path) - 1)
            stats.bytes_draft_target += 8 * len(acc.tokens)
            request.new_tokens = acc.tokens
            if request.out.add(acc.tokens):
                self._finish(request, active)
        for request, exc in failed:
            self._fail_batched(request, active, exc)

    def _finish(self, request, active: list, cancelled: bool = False) -> None:
        """A request is done (or cancelled): send its stats, free its state in every worker."""
        was_active = request in active
        if was_active:
            active.remove(request)
        stats = request.stats
        stats.new_tokens = len(request.out.tokens) if request.out else 0
        stats.total_s = time.perf_counter() - request.t0 if request.t0 else 0.0
        cancelled = cancelled or self._cancelled.pop(request.rid, None) is not None
        request.items.put(self._finished(stats, cancelled))  # first: a dead worker below fails only the others
        if was_active:
            for box in self._inboxes():
                self._send(box, EndRequest(request.rid))

    def _propose(self, draft: _Inbox, rid: str, step: int, new_tokens: list[int], features: ArrayRef | None,
                 stats: ActorStats) -> TreeProposal:
        t = time.perf_counter()
        self._send(draft, ProposeTree(rid, step, new_tokens, features))
        tree = self._recv(draft, TreeProposal, rid, step)
        wait = time.perf_counter() - t
        stats.draft_wait_s += wait
        stats.draft_s += tree.compute_s
        stats.protocol_s += max(0.0, wait - tree.compute_s)
        stats.bytes_draft_target += self._tree_bytes(tree) + 8 * len(new_tokens)
        if features is not None and step > 1:  # per-step features (the prompt's are sent once)
            stats.bytes_draft_target += self._array_bytes(features)
        return tree

    def _root_only(self, token: int):
        """Speculation off: a one-node tree (the last token) in the coordinator's arena."""
        return self.arena.put(np.array([token], dtype=np.int32)), self.arena.put(np.array([-1], dtype=np.int32))

    @staticmethod
    def _array_bytes(ref: ArrayRef) -> int:
        return np.dtype(ref.dtype).itemsize * int(np.prod(ref.shape))

    @classmethod
    def _tree_bytes(cls, tree: TreeProposal) -> int:
        return cls._array_bytes(tree.tokens) + cls._array_bytes(tree.parents)

