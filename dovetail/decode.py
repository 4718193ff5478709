"""The speculative decoding loop: one for the in-process engine and the coordinator alike.

Per step, over the batch of live requests (one or more)::

    trees  <- speculator.propose(requests without a held bet)  # it picks each one's proposers and tree
    verifier.submit(every request's tree)                      # one target forward for the batch
    speculator.bet(request)  for each betting request          # grows tree k+1 while k is verified
    verdict <- verifier.collect(request); commit; stream       # accepted draft tokens + a bonus
    bet     <- speculator.collect_bet(request, verdict)        # it judges its own guess
    bet.held ? next tree = bet.tree : redraft next step
    speculator.learn(request, tree, verdict, timings)          # its cost model learns
    verifier.prefill(one chunk of a joining prompt)            # beside the batch: see below

**Joining a running batch.** A request admitted while others stream (they have decoded a step)
has its prompt prefilled in chunks of ``prefill_chunk`` tokens, one chunk per step, after the
batch's verification (a forward of its own), so the running streams keep their inter-token
latency; it decodes from the step after its last chunk. A short prompt is one such chunk: never a
whole prefill between two of their tokens. With nothing streaming, prompts are prefilled whole at
once (no latency to protect; one large forward is the fastest), and the first tokens of requests
admitted together go out together when the next step begins: a burst's first request does not
stream one token and then wait for the others' prefills. The chunks leave the KV cache a whole prefill
leaves, bit for bit: every row of the target's forward is computed on its own. A draft model
still prefills the whole prompt at once (with the target's first chunk, or after its last when
the two take turns on the same CPUs).

The speculator is a ``TreeSource`` (``dovetail/speculation``): it runs one or more ``Proposer``s
and chooses among them. A request without speculation, or whose proposal this step is the root
alone (the cost model found no tree worth its cost), verifies a root-only tree: plain target
decoding. The speculator owns its bets: ``collect_bet`` tells it the outcome, and it alone
compares its guess. Betting, batching, per-request speculation and the feature drafter all
compose: a proposer takes each request's features (or none) with its tokens, and ``_modes`` is
the one place that decides what a request does.

The proposers and the verifier are objects in this process (``dovetail/local.py``) or adapters
that turn the same calls into messages to the actors (``dovetail/actors/remote.py``). A request's own
failure (``RequestFailure``) ends it alone; anything else propagates to the caller, which knows
whether its workers need restarting.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable

from dovetail.models.tree import DraftTree
from dovetail.request import Failed, Finished, GenerationStats, OutputBuffer, Request, Tokens
from dovetail.steps import (Choice, Drafting, Proposal, Proposer, RequestFailure, StepTimes,  # noqa: F401
                            TreeSource, Verdict, Verifier)

# Tokens of a joining prompt prefilled per step while other requests decode. A running stream then
# waits for one chunk per step instead of the whole prompt: on 2 vCPUs the 1.5B target prefills
# ~80-100 tokens/s, so 256 tokens hold a step ~3 s where a 4k prompt held it ~70 s. Smaller chunks
# shorten that pause (64: ~0.7 s) but add a step of the batch's verification per chunk to the
# joining request's time to first token (~10% more for a 2k prompt at 64); --prefill-chunk tunes it.
PREFILL_CHUNK = 256


def freeze_loaded_heap() -> None:
    """Put every object alive now (models, tokenizer, module tables: ~420k objects once a process
    has loaded) out of the garbage collector's reach. A full collection otherwise walks all of them
    and paused a step for 200-250 ms every dozen seconds of decoding, once per stream's p99
    inter-token latency. Each process that steps the loop (in process, the coordinator) or computes
    for it (the workers) calls this once loaded; what it allocates later is collected as before."""
    gc.collect()
    gc.freeze()


@dataclass(eq=False)
class Live:
    """A request in the loop: its output, statistics, and what its next step starts from."""

    request: Request
    emit: Callable[[object], None]
    out: OutputBuffer
    drafts: bool
    bets: bool
    t0: float
    stats: GenerationStats = field(default_factory=GenerationStats)
    step: int = 0
    new_tokens: list[int] = field(default_factory=list)
    features: object = None
    feature_bytes: int = 0
    tree: Proposal | None = None  # this step's tree, drafted (a held bet: before the step began)
    draft_wait_s: float = 0.0  # this step's wait for the draft
    done: bool = False
    unsent: list[int] = field(default_factory=list)  # a joining prompt's tokens not yet prefilled
    prefilling: bool = False  # its prompt is not all in yet: it does not decode

    @property
    def rid(self) -> str:
        return self.request.request_id


def _failure_message(request_id: str, exc: Exception) -> str:
    return f"request failed: {exc}"


class DecodeLoop:
    def __init__(self, speculator: TreeSource | None, verifier: Verifier, eos_token_ids, context_length: int,
                 max_batch: int = 1, betting: bool = False, cancelled: dict | None = None,
                 on_failure: Callable[[str, Exception], str] = _failure_message, prefill_together: bool = True,
                 prefill_chunk: int = PREFILL_CHUNK):
        """``betting``: the default for requests that do not say; ``cancelled``: request ids to
        stop between steps (the caller adds them); ``on_failure(request_id, exc)``: clean up after
        a request's own failure and say why it ended (it may raise if the workers are broken);
        ``prefill_together``: the draft prefills while the target does (False: after it, for a
        draft that takes turns with the target on the same CPUs); ``prefill_chunk``: tokens of a
        joining prompt prefilled per step while others decode (0: whole prompts)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.prefill_chunk = prefill_chunk
        self.speculator, self.verifier = speculator, verifier
        self.eos, self.context_length = set(int(t) for t in eos_token_ids), context_length
        self.max_batch, self.betting = max_batch, betting
        self.cancelled = cancelled if cancelled is not None else {}
        self.on_failure, self.prefill_together = on_failure, prefill_together
        self.live: list[Live] = []
        self._held: list[tuple[Live, Verdict]] = []  # prefilled whole; first tokens not yet streamed

    @property
    def room(self) -> int:
        return self.max_batch - len(self.live)

    def _modes(self, request: Request) -> tuple[bool, bool]:
        """Whether the request drafts and whether it bets: every combination of speculation,
        betting, batching and drafter works; betting needs a draft to bet with."""
        drafts = self.speculator is not None and request.speculate
        bets = drafts and (self.betting if request.pipeline is None else request.pipeline)
        return drafts, bets

    # -- admission ----------------------------------------------------------------------------
    def admit(self, request: Request, emit: Callable[[object], None]) -> None:
        """Add a request to the batch: prefilled now (it may be done at once), or, with others
        live and a prompt longer than a chunk, one chunk per step from the next one."""
        if self.room < 1:
            raise RuntimeError("the batch is full")
        drafts, bets = self._modes(request)
        budget = min(request.max_new_tokens, self.context_length - len(request.prompt_ids))
        lv = Live(request, emit, OutputBuffer(budget, self.eos, lambda ids: emit(Tokens(ids))), drafts, bets,
                  time.perf_counter())
        lv.stats.pipelined = bets
        if self.cancelled.pop(lv.rid, None) is not None:  # cancelled while it waited
            emit(Finished(lv.stats, cancelled=True))
            return
        self.live.append(lv)
        prompt = list(request.prompt_ids)
        if 0 < self.prefill_chunk and any(other.step > 0 for other in self.live):  # others stream
            lv.unsent, lv.prefilling = prompt, True
            if drafts and self.prefill_together:
                try:
                    self.speculator.start(lv.rid, prompt, request.params, request.tenant)
                except RequestFailure as exc:
                    self._fail(lv, exc)
            return
        try:
            if drafts and self.prefill_together:
                self.speculator.start(lv.rid, prompt, request.params, request.tenant)
            first = self.verifier.start(lv.rid, prompt, request.params)
            if drafts and not self.prefill_together:
                self.speculator.start(lv.rid, prompt, request.params, request.tenant)
        except RequestFailure as exc:
            return self._fail(lv, exc)
        lv.stats.prefill_s = time.perf_counter() - lv.t0
        self._held.append((lv, first))  # streamed when the next step begins, with the rest of its burst

    def _first_token(self, lv: Live, first: Verdict) -> None:
        self._commit(lv, first)
        if lv.done:
            self._finish(lv)

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for lv, first in held:
            if lv in self.live:  # not cancelled or failed since
                self._first_token(lv, first)

    def run(self, requests: list[Request], emit_for: Callable[[Request], Callable]) -> None:
        """Decode ``requests`` to the end in this thread, up to ``max_batch`` at a time."""
        waiting = list(requests)
        while waiting or self.live:
            while waiting and self.room > 0:
                request = waiting.pop(0)
                self.admit(request, emit_for(request))
            if self.live:
                self.step()

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> None:
        """Draft, verify and commit one tree for every decoding request; prefill one chunk of the
        oldest joining prompt (all of it when nothing decodes)."""
        for lv in [lv for lv in self.live if lv.rid in self.cancelled]:
            self._finish(lv, cancelled=True)
        self._release_held()
        decoding = [lv for lv in self.live if not lv.prefilling]
        for lv in decoding:
            lv.step += 1
        self._draft([lv for lv in decoding if lv.drafts and lv.tree is None])
        batch = [lv for lv in decoding if lv in self.live]
        joining = next((lv for lv in self.live if lv.prefilling), None)
        t_send = time.perf_counter()
        trees = [lv.tree.tree if lv.tree is not None else DraftTree([lv.new_tokens[-1]], [-1]) for lv in batch]
        if batch:
            self.verifier.submit([(lv.rid, lv.step, tree) for lv, tree in zip(batch, trees)])
        if joining is not None and not self._send_chunk(  # one chunk beside the batch; all when alone
                joining, self.prefill_chunk if batch else len(joining.unsent)):
            joining = None
        betting = [lv for lv in batch if lv.bets and lv.tree.choice is not None and lv.tree.choice.bets]
        t_bet = time.perf_counter()
        for lv in betting:
            self.speculator.bet(lv.rid, lv.step + 1)
        bet_call_s = (time.perf_counter() - t_bet) / max(len(betting), 1)  # in process: the bet's compute
        verdicts = []
        for lv, tree in zip(batch, trees):
            try:
                verdict = self.verifier.collect(lv.rid, lv.step)
            except RequestFailure as exc:
                self._fail(lv, exc)
                continue
            self._count_verdict(lv.stats, verdict, time.perf_counter() - t_send)
            verdicts.append((lv, lv.tree, verdict))
            self._commit(lv, verdict)
        rows, verify_s = sum(len(t) for t in trees), sum(v.compute_s for _, _, v in verdicts)
        for lv, proposal, verdict in verdicts:
            if lv.drafts:
                context = len(lv.request.prompt_ids) + len(lv.out.tokens) - len(verdict.tokens)
                self.speculator.learn(lv.rid, proposal, verdict, StepTimes(verify_s, rows, context, lv.draft_wait_s))
        for lv in betting:
            if lv in self.live:
                self._settle_bet(lv, bet_call_s)
        for lv in [lv for lv in batch if lv.done and lv in self.live]:
            self._finish(lv)
        if joining is not None:
            self._take_chunk(joining)

    def _send_chunk(self, lv: Live, size: int) -> bool:
        first = len(lv.unsent) == len(lv.request.prompt_ids)
        chunk, lv.unsent = lv.unsent[:size], lv.unsent[size:]
        try:
            self.verifier.prefill(lv.rid, chunk, lv.request.params, first, not lv.unsent)
        except RequestFailure as exc:
            self._fail(lv, exc)
            return False
        return True

    def _take_chunk(self, lv: Live) -> None:
        """A chunk's verdict; after the last, the request decodes from the next step."""
        try:
            verdict = self.verifier.collect(lv.rid, 0)
            if lv.unsent:
                return
            lv.prefilling = False
            if lv.drafts and not self.prefill_together:
                self.speculator.start(lv.rid, list(lv.request.prompt_ids), lv.request.params, lv.request.tenant)
        except RequestFailure as exc:
            return self._fail(lv, exc)
        lv.stats.prefill_s = time.perf_counter() - lv.t0
        self._first_token(lv, verdict)

    def _draft(self, drafting: list[Live]) -> None:
        if not drafting:
            return
        t = time.perf_counter()
        proposals = self.speculator.propose([Drafting(lv.rid, lv.step, lv.new_tokens, lv.features) for lv in drafting])
        wait = time.perf_counter() - t
        for lv, proposal in zip(drafting, proposals):
            if isinstance(proposal, Exception):
                self._fail(lv, proposal)
                continue
            stats = lv.stats
            stats.draft_wait_s += wait
            stats.draft_s += proposal.compute_s
            stats.protocol_s += max(0.0, wait - proposal.compute_s)
            stats.bytes_draft_target += 8 * len(proposal.tree) + 8 * len(lv.new_tokens)
            if lv.step > 1:  # per-step features (the prompt's are sent once)
                stats.bytes_draft_target += lv.feature_bytes
            stats.count_choice(proposal)
            lv.tree, lv.draft_wait_s = proposal, wait

    def _settle_bet(self, lv: Live, bet_call_s: float) -> None:
        t = time.perf_counter()
        try:
            outcome = Drafting(lv.rid, lv.step, lv.new_tokens, lv.features)
            bet = self.speculator.collect_bet(lv.rid, lv.step + 1, outcome)
        except RequestFailure as exc:
            return self._fail(lv, exc)
        wait = bet_call_s + time.perf_counter() - t
        stats = lv.stats
        stats.draft_wait_s += wait
        stats.draft_s += bet.compute_s
        stats.bets += 1
        if bet.held:
            stats.bets_held += 1
            stats.draft_hidden_s += max(0.0, bet.compute_s - wait)
            stats.bytes_draft_target += 8 * len(bet.tree)
            stats.count_choice(bet)
            lv.tree, lv.draft_wait_s = bet, wait

    @staticmethod
    def _count_verdict(stats: GenerationStats, verdict: Verdict, wait: float) -> None:
        stats.verify_wait_s += wait
        stats.verify_s += verdict.compute_s
        stats.protocol_s += max(0.0, wait - verdict.compute_s)
        stats.steps += 1
        stats.accepted_per_step.append(len(verdict.path) - 1)
        stats.bytes_draft_target += 8 * len(verdict.tokens)

    @staticmethod
    def _commit(lv: Live, verdict: Verdict) -> None:
        lv.new_tokens, lv.features, lv.feature_bytes = verdict.tokens, verdict.features, verdict.feature_bytes
        lv.tree = None
        lv.done = lv.out.add(verdict.tokens)

    # -- leaving ----------------------------------------------------------------------------
    def _leave(self, lv: Live) -> None:
        self.live.remove(lv)
        lv.stats.new_tokens = len(lv.out.tokens)
        lv.stats.total_s = time.perf_counter() - lv.t0

    def _finish(self, lv: Live, cancelled: bool = False) -> None:
        """Done or cancelled: its last event first (a dead worker below then fails only the
        others), then its state is freed on both sides."""
        self._leave(lv)
        cancelled = self.cancelled.pop(lv.rid, None) is not None or cancelled
        lv.emit(Finished(lv.stats, cancelled))
        self._end(lv)

    def _end(self, lv: Live) -> None:
        if lv.drafts:
            self.speculator.end(lv.rid)
        self.verifier.end(lv.rid)

    def _fail(self, lv: Live, exc: Exception) -> None:
        """A request's own failure: it alone ends, with the reason; the others go on."""
        self._leave(lv)
        self.cancelled.pop(lv.rid, None)
        try:
            self._end(lv)
            message = self.on_failure(lv.rid, exc)
        except Exception as other:  # the workers are broken: still answer this request
            lv.emit(Failed(f"request failed: {exc} (then: {other})"))
            raise
        lv.emit(Failed(message))

    def fail_all(self, message: str) -> None:
        """The workers failed under the batch: every live request ends with ``message``."""
        self._held = []
        for lv in list(self.live):
            self.live.remove(lv)
            self.cancelled.pop(lv.rid, None)
            lv.emit(Failed(message))
