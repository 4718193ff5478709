"""Target shard actor: one tensor-parallel slice of the CPU target, pinned to one socket.

Every shard gets the same messages and runs the same forward; the layers all-reduce inside each
forward (through shared memory by default, or gloo), so every shard ends with the same logits and makes
the same (seeded) acceptance decision. Only rank 0 answers the coordinator.
"""

from __future__ import annotations

from datetime import timedelta

from dovetail.actors.worker import ChannelWorker, ShardSpec, Timer, lean_loading, pin_to
from dovetail.models.cached_lm import CachedLM
from dovetail.models.target import TargetVerifier, verify_batch
from dovetail.models.tree import DraftTree
from dovetail.protocol.collectives import LocalCollective, ShmCollective, TorchDistributedCollective
from dovetail.models.tp import load_shard
from dovetail.models.verification import SamplingParams
from dovetail.protocol.messages import Accepted, StartRequest, VerifyBatch, VerifyTree
from dovetail.protocol.shm import ShmArena

GROUP_TIMEOUT = timedelta(seconds=60)  # a dead peer turns a collective into an error after this
FEATURE_ROWS = 4096  # the most feature rows one message carries (a longer prompt sends its last ones)


class TargetShard(ChannelWorker):
    handlers = {StartRequest: "start", VerifyTree: "verify", VerifyBatch: "verify_batch"}

    def __init__(self, spec: ShardSpec):
        self.rank = rank = spec.rank
        self.memory_policy = pin_to(spec.cpus, spec.numa_node)  # before loading: first touch lands locally
        self.keep_hidden = spec.features
        self.verifiers: dict[str, TargetVerifier] = {}  # request id -> its KV cache and sampling state
        self.features = None

        def setup():
            self.collective = _collective(spec.collective, spec.group, spec.world_size, rank)
            with lean_loading():
                self.model = load_shard(spec.model_dir, self.collective, spec.kernel, spec.precision)
            self._verifier("warm-up").start([0, 1], SamplingParams())  # every rank runs it: collectives pair up
            self.release("warm-up")
            if spec.features and rank == 0:
                self.features = ShmArena(2 * FEATURE_ROWS * self.model.config.hidden_size * 4 + (1 << 20))

        self._serve(spec.address, f"target-shard-{rank}", setup)

    def ready(self) -> dict:
        return {**self.common_info(), "live_requests": len(self.verifiers), "memory_policy": self.memory_policy,
                "collective": type(self.collective).__name__}

    def _verifier(self, request_id: str) -> TargetVerifier:
        """A new request's state: its own KV cache over the shared weights."""
        verifier = self.verifiers[request_id] = TargetVerifier(CachedLM(self.model, keep_hidden=self.keep_hidden))
        return verifier

    def start(self, msg: StartRequest) -> None:
        verifier = self._verifier(msg.request_id)
        with Timer() as t:
            first = verifier.start(self.view(msg.prompt).tolist(), SamplingParams(**msg.sampling))
        if self.rank == 0:
            self.channel.send(Accepted(msg.request_id, 0, [], [first], t.seconds,
                                       self._put_features(verifier.prompt_features)))

    def verify(self, msg: VerifyTree) -> None:
        verifier = self.state_of(self.verifiers, msg.request_id)
        with Timer() as t:
            acceptance = verifier.verify(DraftTree(self.view(msg.tokens), self.view(msg.parents)))
        if self.rank == 0:
            self.channel.send(Accepted(msg.request_id, msg.step, acceptance.path, acceptance.tokens, t.seconds,
                                       self._put_features(acceptance.features)))

    def verify_batch(self, msg: VerifyBatch) -> None:
        trees = [DraftTree(self.view(tokens), self.view(parents)) for tokens, parents in zip(msg.tokens, msg.parents)]
        with Timer() as t:
            acceptances = verify_batch([self.state_of(self.verifiers, rid) for rid in msg.request_ids], trees)
        if self.rank == 0:
            for rid, step, acceptance in zip(msg.request_ids, msg.steps, acceptances):
                if isinstance(acceptance, Exception):
                    self.report(rid, acceptance)
                else:
                    self.channel.send(Accepted(rid, step, acceptance.path, acceptance.tokens, t.seconds))

    def release(self, request_id: str) -> None:
        self.verifiers.pop(request_id, None)

    def _put_features(self, features):
        if self.features is None or features is None:
            return None
        return self.features.put(features[-FEATURE_ROWS:].float().numpy())

    def _close(self) -> None:
        super()._close()
        if self.features is not None:
            self.features.close()


def _collective(kind: str, group: str, world_size: int, rank: int):
    if world_size == 1:
        return LocalCollective()
    if kind == "shm":
        return ShmCollective(group, world_size, rank, timeout_s=GROUP_TIMEOUT.total_seconds())
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{group}", rank=rank, world_size=world_size,
                            timeout=GROUP_TIMEOUT)
    return TorchDistributedCollective()
