"""The speculative decoding loop: one for the in-process engine and the coordinator alike.

Per step, over the batch of live requests (one or more)::

    trees  <- speculator.propose(requests without a held bet)  # it picks each one's proposers and tree
    verifier.submit(every request's tree)                      # one target forward for the batch
    speculator.bet(request)  for each betting request          # grows tree k+1 while k is verified
    verdict <- verifier.collect(request); commit; stream       # accepted draft tokens + a bonus
    bet     <- speculator.collect_bet(request, verdict)        # it judges its own guess
    bet.held ? next tree = bet.tree : redraft next step
    speculator.learn(request, tree, verdict, timings)          # its cost model learns

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

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from dovetail.models.tree import DraftTree, TreeShape
from dovetail.request import Failed, Finished, GenerationStats, OutputBuffer, Request, Tokens


class RequestFailure(RuntimeError):
    """One request's own computation failed (or timed out); the workers are fine."""

    def __init__(self, request_id: str, message: str):
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class Choice:
    """What a request speculates with in one step: which proposers grow its tree (their trees
    merged under one root) and the tree's budget. ``bets``: its proposer may draft the next tree
    while this one is verified."""

    proposers: tuple[str, ...]
    shape: TreeShape
    bets: bool = False
    width: int = 1  # a draft model's children per expanded node, as the cost model chose it

    def __str__(self) -> str:
        """``proposer@depth``, ``proposer*width@depth`` for a wide model tree (the cost model
        chooses these; a text proposer's width is its data's)."""
        return f"{'+'.join(self.proposers)}{f'*{self.width}' if self.width > 1 else ''}@{self.shape.depth}"


@dataclass
class Drafting:
    """What a proposer learns about one request: the tokens committed since its last tree, and
    for a feature drafter the target's features before each of them (None otherwise).
    ``shape``: the tree to grow (the speculator's choice); None: no tree, only learn the tokens."""

    request_id: str
    step: int
    new_tokens: list[int]
    features: object = None
    shape: TreeShape | None = None


@dataclass
class Proposal:
    tree: DraftTree
    compute_s: float = 0.0  # this request's share of the draft forwards
    guess: list[int] | None = None  # a bet: the committed tokens it assumed
    held: bool | None = None  # a bet, once told the outcome: whether its guess came true
    choice: Choice | None = None  # what grew the tree (a speculator's pick; None: the root alone)
    expected: float = 1.0  # the tokens the speculator expects this step to commit


@dataclass
class Verdict:
    tokens: list[int]  # committed: accepted draft tokens + the bonus (the first token after prefill)
    path: list[int]  # accepted tree nodes, root first (empty after prefill)
    features: object = None  # for a feature drafter: the target's features before each token
    feature_bytes: int = 0
    compute_s: float = 0.0  # this request's share of the target forward


class Proposer(Protocol):
    def start(self, request_id: str, prompt_ids: list[int], params=None) -> None:
        """``params``: the request's ``SamplingParams``, for a proposer that samples by them."""

    def propose(self, items: list[Drafting]) -> list[Proposal | Exception]:
        """Each request's next tree (or its own error), grown together where the draft can."""

    def bet(self, request_id: str, step: int, shape: TreeShape) -> None:
        """Start drafting tree ``step`` (of ``shape``) on a guess of the tree now under verification."""

    def collect_bet(self, request_id: str, step: int, outcome: Drafting) -> Proposal:
        """The bet on tree ``step``, told ``outcome`` (what the tree under verification committed):
        ``held`` says whether the guess came true (the tree is then the next step's); if not, the
        next ``propose`` redrafts from the outcome."""

    def end(self, request_id: str) -> None: ...


class TreeSource(Protocol):
    """What the loop drafts with (``dovetail/speculation``'s ``Speculator``): each request's tree
    per step (from the proposers it picks, or the root alone), bets, and learning from each step."""

    def start(self, request_id: str, prompt_ids: list[int], tenant: str = "", params=None) -> None:
        """``tenant``: whose earlier outputs the request may draft from (never another tenant's);
        ``params``: its ``SamplingParams``."""

    def propose(self, items: list[Drafting]) -> list[Proposal | Exception]:
        """Each request's tree for this step (its ``choice`` says what grew it; None: the root alone)."""

    def bet(self, request_id: str, step: int) -> None:
        """For a request whose current proposal ``bets``: draft its next tree while this one is verified."""

    def collect_bet(self, request_id: str, step: int, outcome: Drafting) -> Proposal:
        """As ``Proposer.collect_bet``."""

    def learn(self, request_id: str, proposal: Proposal | None, verdict: "Verdict", step: "StepTimes") -> None:
        """What one step of the request cost and gave (``proposal``: what it verified)."""

    def end(self, request_id: str) -> None: ...


class Verifier(Protocol):
    def start(self, request_id: str, prompt_ids: list[int], params) -> Verdict: ...

    def submit(self, trees: list[tuple[str, int, object]]) -> None:
        """Verify (request id, step, tree) for the batch, in one forward; ``collect`` each result."""

    def collect(self, request_id: str, step: int) -> Verdict: ...

    def end(self, request_id: str) -> None: ...


@dataclass
class StepTimes:
    """One step, as the cost model learns it: the batch's verification (compute, rows, the
    request's context), and the time the loop waited for the request's draft."""

    verify_s: float
    rows: int
    context: int
    draft_wait_s: float = 0.0


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

    @property
    def rid(self) -> str:
        return self.request.request_id


def _failure_message(request_id: str, exc: Exception) -> str:
    return f"request failed: {exc}"


class DecodeLoop:
    def __init__(self, speculator: TreeSource | None, verifier: Verifier, eos_token_ids, context_length: int,
                 max_batch: int = 1, betting: bool = False, cancelled: dict | None = None,
                 on_failure: Callable[[str, Exception], str] = _failure_message, prefill_together: bool = True):
        """``betting``: the default for requests that do not say; ``cancelled``: request ids to
        stop between steps (the caller adds them); ``on_failure(request_id, exc)``: clean up after
        a request's own failure and say why it ended (it may raise if the workers are broken);
        ``prefill_together``: the draft prefills while the target does (False: after it, for a
        draft that takes turns with the target on the same CPUs)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.speculator, self.verifier = speculator, verifier
        self.eos, self.context_length = set(int(t) for t in eos_token_ids), context_length
        self.max_batch, self.betting = max_batch, betting
        self.cancelled = cancelled if cancelled is not None else {}
        self.on_failure, self.prefill_together = on_failure, prefill_together
        self.live: list[Live] = []

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
        """Prefill a request and add it to the batch (it may be done at once)."""
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
        try:
            if drafts and self.prefill_together:
                self.speculator.start(lv.rid, prompt, request.tenant, request.params)
            first = self.verifier.start(lv.rid, prompt, request.params)
            if drafts and not self.prefill_together:
                self.speculator.start(lv.rid, prompt, request.tenant, request.params)
        except RequestFailure as exc:
            return self._fail(lv, exc)
        lv.stats.prefill_s = time.perf_counter() - lv.t0
        self._commit(lv, first)
        if lv.done:
            self._finish(lv)

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
        """Draft, verify and commit one tree for every live request."""
        for lv in [lv for lv in self.live if lv.rid in self.cancelled]:
            self._finish(lv, cancelled=True)
        for lv in self.live:
            lv.step += 1
        self._draft([lv for lv in self.live if lv.drafts and lv.tree is None])
        batch = list(self.live)
        if not batch:
            return
        t_send = time.perf_counter()
        trees = [lv.tree.tree if lv.tree is not None else DraftTree([lv.new_tokens[-1]], [-1]) for lv in batch]
        self.verifier.submit([(lv.rid, lv.step, tree) for lv, tree in zip(batch, trees)])
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
        for lv in list(self.live):
            self.live.remove(lv)
            self.cancelled.pop(lv.rid, None)
            lv.emit(Failed(message))
