"""Target shard actor: one tensor-parallel slice of the CPU target, pinned to one socket.

Every shard gets the same messages and runs the same forward; the layers all-reduce inside each
forward (through shared memory by default, or gloo), so every shard ends with the same logits and makes
the same (seeded) acceptance decision. Only rank 0 answers the coordinator.
"""

from __future__ import annotations

from datetime import timedelta

from dovetail.actors.worker import ChannelWorker, ShardSpec, lean_loading, pin_to, read_tree
from dovetail.local import LocalVerifier
from dovetail.models.cached_lm import CachedLM
from dovetail.models.target import TargetVerifier
from dovetail.protocol.collectives import LocalCollective, ShmCollective, TorchDistributedCollective
from dovetail.models.tp import load_shard
from dovetail.protocol.messages import Accepted, PrefillChunk, StartRequest, VerifyBatch, VerifyTree
from dovetail.protocol.shm import ShmArena
from dovetail.sampling import SamplingParams

GROUP_TIMEOUT = timedelta(seconds=60)  # a dead peer turns a collective into an error after this
FEATURE_ROWS = 4096  # the most feature rows one message carries (a longer prompt sends its last ones)


class TargetShard(ChannelWorker):
    handlers = {StartRequest: "start", PrefillChunk: "prefill", VerifyTree: "verify", VerifyBatch: "verify_batch"}

    def __init__(self, spec: ShardSpec):
        self.rank = rank = spec.rank
        self.memory_policy = pin_to(spec.cpus, spec.numa_node)  # before loading: first touch lands locally
        self.features = None
        self.prefill_chunks = 0  # prompt chunks prefilled beside running requests (``ready`` reports it)

        def setup():
            self.collective = _collective(spec.collective, spec.group, spec.world_size, rank)
            with lean_loading():
                self.model = load_shard(spec.model, self.collective, spec.kernel)
            self.local = LocalVerifier(lambda: TargetVerifier(CachedLM(self.model, keep_hidden=spec.features)))
            self.local.start("warm-up", [0, 1], SamplingParams())  # every rank runs it: collectives pair up
            self.release("warm-up")
            if spec.features and rank == 0:  # a prompt's features per request of a batch, + one step's
                row_bytes = self.model.config.hidden_size * 4
                self.features = ShmArena((spec.max_batch + 1) * FEATURE_ROWS * row_bytes + (1 << 20))

        self._serve(spec.address, f"target-shard-{rank}", setup)

    def ready(self) -> dict:
        return {**self.common_info(), "live_requests": len(self.local.states), "memory_policy": self.memory_policy,
                "collective": type(self.collective).__name__, "prefill_chunks": self.prefill_chunks}

    def start(self, msg: StartRequest) -> None:
        verdict = self.local.start(msg.request_id, self.view(msg.prompt).tolist(), SamplingParams(**msg.sampling))
        if self.rank == 0:
            self._reply(msg.request_id, 0, verdict)

    def prefill(self, msg: PrefillChunk) -> None:
        """One chunk of a prompt; every chunk is answered (its error reported, as any handler's)."""
        params = SamplingParams(**msg.sampling) if msg.first else None
        self.local.prefill(msg.request_id, self.view(msg.tokens).tolist(), params, msg.first, msg.final)
        verdict = self.local.collect(msg.request_id, 0)
        self.prefill_chunks += 1
        if self.rank == 0:
            self._reply(msg.request_id, 0, verdict)

    def verify(self, msg: VerifyTree) -> None:
        self._verify([(msg.request_id, msg.step, read_tree(self.view, msg.tokens, msg.parents, msg.q_tokens,
                                                           msg.q_probs))])

    def verify_batch(self, msg: VerifyBatch) -> None:
        n = len(msg.request_ids)
        self._verify([(rid, step, read_tree(self.view, tokens, parents, q_tokens, q_probs))
                      for rid, step, tokens, parents, q_tokens, q_probs
                      in zip(msg.request_ids, msg.steps, msg.tokens, msg.parents, msg.q_tokens or [None] * n,
                             msg.q_probs or [None] * n)])

    def _verify(self, trees: list) -> None:
        """One forward for every tree; rank 0 answers each request (or reports its own error)."""
        verdicts = self.local.verify(trees)
        if self.rank == 0:
            for (rid, step, _), verdict in zip(trees, verdicts):
                if isinstance(verdict, Exception):
                    self.report(rid, verdict)
                else:
                    self._reply(rid, step, verdict)

    def _reply(self, request_id: str, step: int, verdict) -> None:
        self.channel.send(Accepted(request_id, step, verdict.path, verdict.tokens, verdict.compute_s,
                                   self._put_features(verdict.features)))

    def release(self, request_id: str) -> None:
        self.local.end(request_id)

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
