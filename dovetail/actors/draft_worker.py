"""Draft actor: the small draft LM and its KV cache, on the GPU when there is one.

It answers ``ProposeTree`` (grow the tree after these committed tokens), ``ProposeBatch`` (the
same for a batch of requests, their trees grown together) and ``Predraft`` (bet on the tree now
under verification and grow the next one). Trees go out as int32 arrays in this
actor's shared-memory arena; the coordinator forwards the references to the shards unchanged.
With a Dovetail feature drafter (a drafter folder) it reads the target's features, which
``ProposeTree`` points to in shard 0's arena, and does not bet (no ``Predraft``).
"""

from __future__ import annotations

import numpy as np
import torch

from dovetail.actors.worker import ChannelWorker, DraftSpec, Timer, lean_loading, pin_to
from dovetail.models.cached_lm import CachedLM
from dovetail.models.drafter_net import load_drafter
from dovetail.store import is_drafter_dir
from dovetail.models.lm_proposer import DraftProposer, propose_together
from dovetail.models.feature_proposer import FeatureDraftProposer
from dovetail.models.loading import load_causal_lm
from dovetail.models.tree import DraftTree
from dovetail.protocol.messages import Predraft, ProposeBatch, ProposeTree, StartRequest, TreeProposal
from dovetail.protocol.shm import ShmArena


class DraftWorker(ChannelWorker):
    handlers = {StartRequest: "start", ProposeTree: "propose", ProposeBatch: "propose_batch", Predraft: "predraft"}

    def __init__(self, spec: DraftSpec):
        self.placement = "cuda" if spec.device == "cuda" else pin_to(spec.cpus, None)
        feature_drafter = is_drafter_dir(spec.model_dir)
        # a GPU gets bf16 below: the kernels are CPU ones
        precision = "fp32" if spec.device == "cuda" else spec.precision
        self.proposers: dict = {}  # request id -> its proposer (own KV cache over the shared weights)
        self.arena = ShmArena(1 << 20)

        def setup():
            with lean_loading():
                if feature_drafter:
                    model = load_drafter(spec.model_dir, spec.target_dir, draft_vocab=spec.draft_vocab,
                                         precision=precision)
                else:
                    model = load_causal_lm(spec.model_dir, precision=precision, role="draft")
            if spec.device == "cuda":
                model = model.to("cuda", torch.bfloat16)
            shape = spec.tree
            if feature_drafter:
                self._new_proposer = lambda: FeatureDraftProposer(CachedLM(model), shape)
                warm_up = self._new_proposer()
                warm_up.start([0, 1])
                warm_up.propose([1], torch.zeros(2, model.config.hidden_size))
            else:
                self._new_proposer = lambda: DraftProposer(CachedLM(model), shape, spec.vocab_limit)
                warm_up = self._new_proposer()
                warm_up.start([0, 1])
                warm_up.propose([1])

        self._serve(spec.address, "draft", setup)

    def ready(self) -> dict:
        return {**self.common_info(), "live_requests": len(self.proposers), "placement": self.placement, "arena": self.arena.name}

    def start(self, msg: StartRequest) -> None:
        proposer = self.proposers[msg.request_id] = self._new_proposer()
        proposer.start(self.view(msg.prompt).tolist())

    def propose(self, msg: ProposeTree) -> None:
        proposer = self.state_of(self.proposers, msg.request_id)
        with Timer() as t:
            if proposer.uses_features:
                tree = proposer.propose(msg.new_tokens, torch.from_numpy(np.array(self.view(msg.features))))
            elif proposer.betting:
                tree, _ = proposer.resolve(msg.new_tokens)
            else:
                tree = proposer.propose(msg.new_tokens)
        self._send_tree(msg.request_id, msg.step, tree, [], t.seconds)

    def propose_batch(self, msg: ProposeBatch) -> None:
        batch = []  # a request whose state is missing fails alone; the others draft together
        for rid, step, new_tokens in zip(msg.request_ids, msg.steps, msg.new_tokens):
            try:
                batch.append((rid, step, new_tokens, self.state_of(self.proposers, rid)))
            except RuntimeError as exc:
                self.report(rid, exc)
        if not batch:
            return
        with Timer() as t:
            trees = propose_together([b[3] for b in batch], [b[2] for b in batch])
        for (rid, step, _, _), tree in zip(batch, trees):
            self._send_tree(rid, step, tree, [], t.seconds / len(trees))  # each its share of the shared forwards

    def predraft(self, msg: Predraft) -> None:
        proposer = self.state_of(self.proposers, msg.request_id)
        with Timer() as t:
            if msg.settled:
                _, held = proposer.resolve(msg.settled)
                if not held:
                    raise RuntimeError("the coordinator settled a bet that did not hold")
            guess, tree = proposer.predraft()
        self._send_tree(msg.request_id, msg.step, tree, guess, t.seconds)

    def release(self, request_id: str) -> None:
        self.proposers.pop(request_id, None)

    def _send_tree(self, request_id: str, step: int, tree: DraftTree, guess: list[int], seconds: float) -> None:
        self.channel.send(TreeProposal(request_id, step, self.arena.put(tree.tokens.astype(np.int32)),
                                       self.arena.put(tree.parents.astype(np.int32)), guess, seconds))

    def _close(self) -> None:
        super()._close()
        self.arena.close()
