"""Draft actor: the small draft LM and its KV caches, on the GPU when there is one.

It answers ``ProposeTree`` / ``ProposeBatch`` (grow the next trees after these committed tokens,
together where it can) and ``Predraft`` (bet on the tree under verification and grow the next
one) through ``dovetail/local.py``'s proposer, one per request, exactly as in process. Trees go
out as int32 arrays in this actor's shared-memory arena, which the coordinator reads. A Dovetail
feature drafter (a drafter folder) also reads the target's features, which the messages point to
in shard 0's arena.
"""

from __future__ import annotations

import numpy as np
import torch

from dovetail.actors.worker import ChannelWorker, DraftSpec, lean_loading, pin_to, put_tree
from dovetail.decode import Drafting
from dovetail.local import LocalProposer
from dovetail.models.cached_lm import CachedLM
from dovetail.models.drafter_net import load_drafter
from dovetail.models.feature_proposer import FeatureDraftProposer
from dovetail.models.lm_proposer import DraftProposer
from dovetail.models.loading import load_causal_lm
from dovetail.models.tree import DraftTree, TreeShape
from dovetail.protocol.messages import ArrayRef, Predraft, ProposeBatch, ProposeTree, StartRequest, TreeProposal
from dovetail.protocol.shm import ShmArena
from dovetail.sampling import SamplingParams


class DraftWorker(ChannelWorker):
    handlers = {StartRequest: "start", ProposeTree: "propose", ProposeBatch: "propose_batch", Predraft: "predraft"}

    def __init__(self, spec: DraftSpec):
        self.placement = "cuda" if spec.device == "cuda" else pin_to(spec.cpus, None)
        feature_drafter = spec.drafter_dir is not None
        self.arena = ShmArena(1 << 20)

        def setup():
            with lean_loading():
                if feature_drafter:
                    model = load_drafter(spec.drafter_dir, spec.target_float_weights, draft_vocab=spec.draft_vocab,
                                         precision="fp32" if spec.device == "cuda" else spec.drafter_precision)
                else:
                    model = load_causal_lm(spec.model)
            if spec.device == "cuda":  # bf16 there (the driver sent an fp32 spec: the kernels are CPU ones)
                model = model.to("cuda", torch.bfloat16)
            if feature_drafter:
                prototype = FeatureDraftProposer(CachedLM(model), spec.tree)
            else:
                prototype = DraftProposer(CachedLM(model), spec.tree, spec.vocab)
            self.local = LocalProposer(prototype.fresh)
            warm_up = prototype.fresh()
            warm_up.start([0, 1])
            warm_up.propose([1], torch.zeros(2, model.config.hidden_size))

        self._serve(spec.address, "draft", setup)

    def ready(self) -> dict:
        return {**self.common_info(), "live_requests": len(self.local.states), "placement": self.placement,
                "arena": self.arena.name}

    def start(self, msg: StartRequest) -> None:
        self.local.start(msg.request_id, self.view(msg.prompt).tolist(),
                         SamplingParams(**msg.sampling) if msg.sampling else None)

    def propose(self, msg: ProposeTree) -> None:
        self._propose([Drafting(msg.request_id, msg.step, msg.new_tokens, self._features(msg.features),
                                _shape(msg.shape))])

    def propose_batch(self, msg: ProposeBatch) -> None:
        features = msg.features or [None] * len(msg.request_ids)
        shapes = msg.shapes or [None] * len(msg.request_ids)
        self._propose([Drafting(rid, step, new_tokens, self._features(ref), _shape(shape))
                       for rid, step, new_tokens, ref, shape
                       in zip(msg.request_ids, msg.steps, msg.new_tokens, features, shapes)])

    def _propose(self, items: list[Drafting]) -> None:
        """A request whose own drafting fails is reported alone; the others get their trees."""
        for item, proposal in zip(items, self.local.propose(items)):
            if isinstance(proposal, Exception):
                self.report(item.request_id, proposal)
            else:
                self._send_tree(item.request_id, item.step, proposal.tree, [], proposal.compute_s)

    def predraft(self, msg: Predraft) -> None:
        settled = Drafting(msg.request_id, msg.step, msg.settled, self._features(msg.features)) if msg.settled else None
        bet = self.local.place_bet(msg.request_id, settled, _shape(msg.shape))
        self._send_tree(msg.request_id, msg.step, bet.tree, bet.guess, bet.compute_s)

    def release(self, request_id: str) -> None:
        self.local.end(request_id)

    def _features(self, ref: ArrayRef | None) -> torch.Tensor | None:
        """A copy of the target's features (shard 0 reuses its arena)."""
        return None if ref is None else torch.from_numpy(np.array(self.view(ref)))

    def _send_tree(self, request_id: str, step: int, tree: DraftTree, guess: list[int], seconds: float) -> None:
        self.channel.send(TreeProposal(request_id, step, guess=guess, compute_s=seconds,
                                       **put_tree(self.arena, tree, scores=True)))

    def _close(self) -> None:
        super()._close()
        self.arena.close()


def _shape(fields: list[float] | None) -> TreeShape | None:
    """A message's ``TreeShape.fields()`` back as a shape; None stays None."""
    return None if fields is None else TreeShape.from_fields(fields)
