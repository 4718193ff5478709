"""The proposer and the verifier of ``dovetail/decode.py`` as messages to the draft and shard actors.

The loop's calls become protocol messages on the coordinator's channels (a ``Link``: the
coordinator itself). The loop sees ``DraftTree``s: a proposal's arrays are read from the draft's
arena, a tree to verify is put in the coordinator's (a few hundred bytes each way); features stay
in shared memory and only their references travel.
A ``RequestFailure`` from the link (a worker's error report, a missed deadline) is that request's
alone; a ``WorkerFailure`` propagates to the coordinator.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from dovetail.actors.messaging import Inbox
from dovetail.actors.worker import put_tree, read_tree
from dovetail.decode import Drafting, Proposal, RequestFailure, Verdict
from dovetail.local import Bets
from dovetail.models.tree import DraftTree, TreeShape
from dovetail.protocol.messages import (Accepted, ArrayRef, EndRequest, Predraft, PrefillChunk, ProposeBatch,
                                        ProposeTree, StartRequest, TreeProposal, VerifyBatch, VerifyTree)
from dovetail.protocol.shm import ArenaReader, ShmArena


class Link(Protocol):
    """What the adapters use of the coordinator (``actors/coordinator.py``, its channels from
    ``actors/messaging.py``): the workers' inboxes, its own arena for what it sends, a reader of
    the workers' arenas, and deadline-aware ``send`` / ``receive``. The inboxes change when the
    workers restart, so the adapters look them up on every call."""

    draft: Inbox | None
    shards: list[Inbox]
    arena: ShmArena
    views: ArenaReader

    def send(self, box: Inbox, msg) -> None: ...

    def receive(self, box: Inbox, kind: type, request_id: str, step: int): ...

    def settle(self, box: Inbox) -> None: ...


def array_bytes(ref: ArrayRef | None) -> int:
    return 0 if ref is None else np.dtype(ref.dtype).itemsize * int(np.prod(ref.shape))


class DraftTurns:
    """A draft that computes on the target's CPUs takes turns with it: a prompt's draft prefill is
    sent without waiting (the first token goes out meanwhile), but the target is sent no work
    until the draft has finished it. Both at once, each runs several times slower: their thread
    teams fight for the same cores (a burst of eight prompts took 5.6 s to prefill instead of 4.6)."""

    def __init__(self, link: Link):
        self.link, self.pending = link, False

    def started(self) -> None:
        self.pending = True

    def caught_up(self) -> None:
        """The draft answered a later message, so it has handled every earlier one."""
        self.pending = False

    def wait(self) -> None:
        if self.pending:
            self.link.settle(self.link.draft)
            self.pending = False


class RemoteProposer:
    def __init__(self, link: Link, turns: DraftTurns | None = None):
        self.link, self.turns = link, turns
        self.book = Bets()

    def _proposal(self, reply: TreeProposal) -> Proposal:
        tree = read_tree(self.link.views.view, reply.tokens, reply.parents, reply.q_tokens, reply.q_probs,
                         reply.scores)
        return Proposal(tree, reply.compute_s, reply.guess)

    def start(self, request_id: str, prompt_ids: list[int], params=None, tenant: str = "") -> None:
        """As ``local.LocalProposer.start`` (a model drafts from the request alone, whatever its tenant)."""
        prompt = self.link.arena.put(np.asarray(prompt_ids, dtype=np.int32))
        sampling = dataclasses.asdict(params) if params is not None else {}
        self.link.send(self.link.draft, StartRequest(request_id, prompt, sampling))
        if self.turns:
            self.turns.started()

    def propose(self, items: list[Drafting]) -> list[Proposal | Exception]:
        if len(items) == 1:
            (item,) = items
            msg = ProposeTree(item.request_id, item.step, item.new_tokens, item.features, _fields(item.shape))
        else:
            msg = ProposeBatch([i.request_id for i in items], [i.step for i in items], [i.new_tokens for i in items],
                               [i.features for i in items], [_fields(i.shape) for i in items])
        self.link.send(self.link.draft, msg)
        results: list[Proposal | Exception] = []
        for item in items:
            try:
                results.append(self._proposal(self.link.receive(self.link.draft, TreeProposal, item.request_id,
                                                                item.step)))
            except RequestFailure as exc:
                results.append(exc)
        if self.turns:
            self.turns.caught_up()
        return results

    def bet(self, request_id: str, step: int, shape: TreeShape) -> None:
        settled = self.book.take_settled(request_id)
        self.link.send(self.link.draft, Predraft(request_id, step, settled.new_tokens if settled else [],
                                                 settled.features if settled else None, _fields(shape)))

    def collect_bet(self, request_id: str, step: int, outcome: Drafting) -> Proposal:
        bet = self._proposal(self.link.receive(self.link.draft, TreeProposal, request_id, step))
        return self.book.judge(request_id, bet, outcome)

    def end(self, request_id: str) -> None:
        self.book.end(request_id)
        self.link.send(self.link.draft, EndRequest(request_id))


def _fields(shape: TreeShape | None) -> list[float] | None:
    return None if shape is None else shape.fields()


def _verdict(reply: Accepted) -> Verdict:
    return Verdict(reply.tokens, reply.path, reply.features, array_bytes(reply.features), reply.compute_s)


class RemoteVerifier:
    def __init__(self, link: Link, turns: DraftTurns | None = None):
        self.link, self.turns = link, turns

    def _to_shards(self, msg) -> None:
        for box in self.link.shards:
            self.link.send(box, msg)

    def _compute(self, msg) -> None:
        """Work for the shards: after the draft's, when the two take turns."""
        if self.turns:
            self.turns.wait()
        self._to_shards(msg)

    def start(self, request_id: str, prompt_ids: list[int], params) -> Verdict:
        prompt = self.link.arena.put(np.asarray(prompt_ids, dtype=np.int32))
        self._compute(StartRequest(request_id, prompt, dataclasses.asdict(params)))
        return self.collect(request_id, 0)

    def prefill(self, request_id: str, tokens: list[int], params, first: bool, final: bool) -> None:
        chunk = self.link.arena.put(np.asarray(tokens, dtype=np.int32))
        self._compute(PrefillChunk(request_id, chunk, first, final, dataclasses.asdict(params) if first else {}))

    def submit(self, trees: list[tuple[str, int, DraftTree]]) -> None:
        refs = [put_tree(self.link.arena, tree) for _, _, tree in trees]
        if len(trees) == 1:
            ((rid, step, _),), (ref,) = trees, refs
            self._compute(VerifyTree(rid, step, **ref))
        else:
            self._compute(VerifyBatch([rid for rid, _, _ in trees], [step for _, step, _ in trees],
                                        **{name: [r.get(name) for r in refs]
                                           for name in ("tokens", "parents", "q_tokens", "q_probs")}))

    def collect(self, request_id: str, step: int) -> Verdict:
        return _verdict(self.link.receive(self.link.shards[0], Accepted, request_id, step))

    def end(self, request_id: str) -> None:
        self._to_shards(EndRequest(request_id))
