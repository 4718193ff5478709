"""The proposer and the verifier of ``dovetail/decode.py`` over models loaded in this process.

Each request gets its own draft proposer and target verifier (its own KV cache) over one set of
weights. The in-process engine calls these directly; the draft and target-shard actors wrap the
same objects and only translate messages, so both engines run the very same code per request.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch

from dovetail.decode import Drafting, Proposal, RequestFailure, Verdict
from dovetail.models.lm_proposer import ModelProposer
from dovetail.models.target import TargetVerifier, verify_batch
from dovetail.models.tree import DraftTree
from dovetail.steps import guessed_right


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def state_of(states: dict, request_id: str):
    """A live request's per-request state; a clear error for one that never started or ended."""
    try:
        return states[request_id]
    except KeyError:
        raise RuntimeError(f"no request {request_id!r} here (it never started, or it already ended)") from None


def _proposal(tree: DraftTree | None, seconds: float, guess: list[int] | None = None, root: int = 0) -> Proposal:
    """A proposal; no tree (the request only fed its tokens this step): the root alone."""
    return Proposal(tree if tree is not None else DraftTree([root], [-1]), seconds, guess)


class Bets:
    """What an adapter keeps of its draft's bets: for each request, the outcome of a bet that
    held, which the draft must be told with the next bet (it still holds the tree it grew on the
    guess). The one place a guess is compared with what the target committed."""

    def __init__(self):
        self.settled: dict[str, Drafting] = {}

    def judge(self, request_id: str, bet: Proposal, outcome: Drafting) -> Proposal:
        held = guessed_right(bet.guess, outcome.new_tokens)
        if held:
            self.settled[request_id] = outcome
        return replace(bet, held=held)

    def take_settled(self, request_id: str) -> Drafting | None:
        return self.settled.pop(request_id, None)

    def end(self, request_id: str) -> None:
        self.settled.pop(request_id, None)


class LocalProposer:
    """Draft-model proposers (``lm_proposer.ModelProposer``s), one per request."""

    def __init__(self, new_proposer: Callable[[], ModelProposer]):
        self.new_proposer = new_proposer
        self.states: dict = {}
        self._bets: dict[str, Proposal] = {}
        self.book = Bets()

    def start(self, request_id: str, prompt_ids: list[int], params=None, tenant: str = "") -> None:
        """``params``: the request's ``SamplingParams`` (a draft model samples its trees by them); a
        model drafts from the request alone, whatever its ``tenant``."""
        proposer = self.states[request_id] = self.new_proposer()
        proposer.start(prompt_ids, params)

    def propose(self, items: list[Drafting]) -> list[Proposal | Exception]:
        """Requests without an open bet grow their trees together; one whose bet missed redrafts
        from where the bet went wrong."""
        results: dict[str, Proposal | Exception] = {}
        fresh = []
        for item in items:
            try:
                proposer = state_of(self.states, item.request_id)
            except RuntimeError as exc:
                results[item.request_id] = exc
                continue
            if proposer.betting:
                results[item.request_id] = self._resolve(proposer, item)
            else:
                fresh.append((item, proposer))
        if fresh:
            proposers = [p for _, p in fresh]
            try:
                with Timer() as t:
                    trees = type(proposers[0]).propose_many(proposers, [i.new_tokens for i, _ in fresh],
                                                            [i.features for i, _ in fresh],
                                                            [i.shape for i, _ in fresh])
                for (item, _), tree in zip(fresh, trees):
                    results[item.request_id] = _proposal(tree, t.seconds / len(fresh), root=item.new_tokens[-1])
            except Exception as exc:  # the shared forward failed: every request in it
                results.update((item.request_id, exc) for item, _ in fresh)
        return [results[item.request_id] for item in items]

    @staticmethod
    def _resolve(proposer: ModelProposer, item: Drafting) -> Proposal | Exception:
        """The bet's outcome (a held bet's tree is this step's), then a new tree if it missed and
        the item asks for one."""
        try:
            with Timer() as t:
                held = proposer.settle(item.new_tokens, item.features)
                tree = proposer.tree if held else (proposer.grow(item.shape) if item.shape is not None else None)
            return _proposal(tree, t.seconds, root=item.new_tokens[-1])
        except Exception as exc:
            return exc

    def bet(self, request_id: str, step: int, shape=None) -> None:
        """Here the bet is drafted at once (the target verifies after): same trees, no overlap."""
        self._bets[request_id] = self.place_bet(request_id, self.book.take_settled(request_id), shape)

    def place_bet(self, request_id: str, settled: Drafting | None, shape=None) -> Proposal:
        """Settle the previous bet (``settled``: its outcome, when it held) and bet again (the
        draft actor calls this with what the coordinator's ``Bets`` kept)."""
        proposer = state_of(self.states, request_id)
        with Timer() as t:
            if settled is not None and not proposer.settle(settled.new_tokens, settled.features):
                raise RuntimeError("a bet was settled that did not hold")
            guess, tree = proposer.predraft(shape)
        return _proposal(tree, t.seconds, guess)

    def collect_bet(self, request_id: str, step: int, outcome: Drafting) -> Proposal:
        return self.book.judge(request_id, self._bets.pop(request_id), outcome)

    def end(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        self._bets.pop(request_id, None)
        self.book.end(request_id)


class LocalVerifier:
    """Target verifiers, one per request; a batch's trees are verified in one forward."""

    def __init__(self, new_verifier: Callable[[], TargetVerifier]):
        self.new_verifier = new_verifier
        self.states: dict[str, TargetVerifier] = {}
        self._submitted: list[tuple[str, int, DraftTree]] = []
        self._chunks: dict[str, tuple] = {}  # request id -> a prompt chunk to prefill when collected
        self._results: dict[str, Verdict | Exception] = {}

    def start(self, request_id: str, prompt_ids: list[int], params) -> Verdict:
        verifier = self.states[request_id] = self.new_verifier()
        with Timer() as t:
            first = verifier.start(prompt_ids, params)
        return Verdict([first], [], *_features(verifier.prompt_features), t.seconds)

    def prefill(self, request_id: str, tokens: list[int], params, first: bool, final: bool) -> None:
        """One chunk of a prompt, prefilled when ``collect(request_id, 0)`` asks for it (after the
        batch's trees, which the running requests wait for)."""
        self._chunks[request_id] = (list(tokens), params, first, final)

    def _prefill_chunk(self, request_id: str) -> None:
        tokens, params, first, final = self._chunks.pop(request_id)
        try:
            if first:
                self.states[request_id] = self.new_verifier()
            verifier = state_of(self.states, request_id)
            with Timer() as t:
                token = verifier.prefill(tokens, params, first, final)
            self._results[request_id] = (Verdict([token], [], *_features(verifier.prompt_features), t.seconds)
                                         if final else Verdict([], [], compute_s=t.seconds))
        except Exception as exc:  # the request's own: it alone fails
            self._results[request_id] = exc

    def submit(self, trees: list[tuple[str, int, DraftTree]]) -> None:
        self._submitted = list(trees)

    def collect(self, request_id: str, step: int) -> Verdict:
        if step == 0 and request_id in self._chunks:
            self._prefill_chunk(request_id)
        elif self._submitted:
            self._verify_submitted()
        result = self._results.pop(request_id)
        if isinstance(result, Exception):
            raise RequestFailure(request_id, f"{type(result).__name__}: {result}")
        return result

    def verify(self, trees: list[tuple[str, int, DraftTree]]) -> list[Verdict | Exception]:
        """Every tree's verdict (or its own error), in order."""
        self.submit(trees)
        self._verify_submitted()
        return [self._results.pop(rid) for rid, _, _ in trees]

    def _verify_submitted(self) -> None:
        batch, self._submitted = self._submitted, []
        ready = []
        for rid, _, tree in batch:
            try:
                ready.append((rid, state_of(self.states, rid), tree))
            except RuntimeError as exc:
                self._results[rid] = exc
        if not ready:
            return
        with Timer() as t:
            if len(ready) == 1:  # one request: its own forward
                try:
                    accepted_paths = [ready[0][1].verify(ready[0][2])]
                except Exception as exc:
                    accepted_paths = [exc]
            else:
                accepted_paths = verify_batch([v for _, v, _ in ready], [tree for _, _, tree in ready])
        for (rid, _, _), accepted in zip(ready, accepted_paths):
            self._results[rid] = accepted if isinstance(accepted, Exception) else Verdict(
                accepted.tokens, accepted.path, *_features(accepted.features), t.seconds / len(ready))

    def end(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        self._chunks.pop(request_id, None)
        self._results.pop(request_id, None)


def _features(features: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """Features and the bytes they would cross a process boundary in (float32)."""
    return features, 0 if features is None else 4 * features.numel()
