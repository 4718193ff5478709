"""What the decode loop (``dovetail/decode.py``) and its parts exchange: a step's ``Choice``, what
a proposer learns (``Drafting``), what it proposes (``Proposal``), what the target commits
(``Verdict``), a step's times (``StepTimes``), a request's own failure (``RequestFailure``), and
the protocols the loop calls: ``Proposer``, ``TreeSource`` (the speculator) and ``Verifier``.
``dovetail.decode`` re-exports them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dovetail.models.tree import DraftTree, TreeShape


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


def guessed_right(guess: list[int] | None, committed: list[int]) -> bool:
    """Whether a bet's guessed tokens are what the target committed: the one place a guess is
    judged (the draft models' ``settle`` and the adapters' ``Bets``)."""
    return guess is not None and [int(t) for t in guess] == [int(t) for t in committed]


class Proposer(Protocol):
    def start(self, request_id: str, prompt_ids: list[int], params=None, tenant: str = "") -> None:
        """``params``: the request's ``SamplingParams``, for a proposer that samples by them;
        ``tenant``: whose earlier outputs the request may draft from (never another tenant's)."""

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

    def start(self, request_id: str, prompt_ids: list[int], params=None, tenant: str = "") -> None:
        """As ``Proposer.start``."""

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
    def start(self, request_id: str, prompt_ids: list[int], params) -> Verdict:
        """Prefill the whole prompt; the verdict's one token is the first generated."""

    def prefill(self, request_id: str, tokens: list[int], params, first: bool, final: bool) -> None:
        """Prefill one chunk of the prompt (``first``: the request starts with it, under ``params``;
        ``final``: the prompt is then all in). ``collect(request_id, 0)`` gives its verdict: the
        first generated token after the final chunk, no tokens before. The chunks leave the KV
        cache that ``start`` leaves, bit for bit (every row is computed on its own)."""

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
