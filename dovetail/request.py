"""A request as every engine takes it, the one check it passes at the edge, and what comes back.

An engine's ``submit(Request)`` streams ``Tokens`` per step, then ``Finished`` (with the
request's ``GenerationStats``) or ``Failed``. ``collect`` turns that stream into a
``GenerationResult`` for callers that want the whole answer.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field

import numpy as np

from dovetail.errors import EngineError, UserError
from dovetail.sampling import SamplingParams


class RequestError(UserError):
    """A request refused before any model work; ``param`` and ``code`` name the field for HTTP."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def check_request(prompt_ids: list[int], max_new_tokens: int | None, context: int) -> None:
    """The one request check, shared by the CLI, the Python API, HTTP and the engines.
    ``max_new_tokens=None`` means "until EOS or the end of the context"."""
    if len(prompt_ids) == 0:
        raise RequestError("the prompt is empty", param="prompt")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}", param="max_tokens")
    if len(prompt_ids) >= context:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the target's context is {context}",
                           param="prompt", code="context_length_exceeded")


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    speculate: bool = True  # False: the target alone (every tree is just the root)
    pipeline: bool | None = None  # bet on the tree under verification; None: the engine's default
    tenant: str = ""  # drafts may reuse earlier outputs of the same tenant only (the suffix cache)
    request_id: str = field(default_factory=lambda: secrets.token_hex(6))


@dataclass
class GenerationStats:
    new_tokens: int = 0
    steps: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0  # draft compute (this request's share of shared forwards)
    verify_s: float = 0.0  # target compute (its share of a batch's forward)
    total_s: float = 0.0
    accepted_per_step: list[int] = field(default_factory=list)  # accepted draft tokens per step
    pipelined: bool = False
    bets: int = 0
    bets_held: int = 0
    draft_hidden_s: float = 0.0  # draft compute that ran while the target verified, and was used
    draft_wait_s: float = 0.0  # the loop blocked on the draft
    verify_wait_s: float = 0.0  # the loop blocked on the target
    protocol_s: float = 0.0  # waits not explained by compute: messages, wake-ups, copies
    bytes_draft_target: int = 0  # tree arrays, token ids and features between draft and target
    choices: dict = field(default_factory=dict)  # "proposer@depth" (or "none") -> steps that used it
    predicted_tokens: float = 0.0  # what the cost model expected the drafted steps to commit, summed
    draft_tokens: int = 0  # draft tokens proposed along the deepest path, summed over steps

    def count_choice(self, proposal) -> None:
        """One drafted step: what the speculator chose, and the tokens it expected."""
        key = "none" if proposal.choice is None else str(proposal.choice)
        self.choices[key] = self.choices.get(key, 0) + 1
        self.predicted_tokens += proposal.expected
        self.draft_tokens += proposal.choice.shape.depth if proposal.choice is not None else 0

    @property
    def predicted_per_step(self) -> float:
        steps = sum(self.choices.values())
        return self.predicted_tokens / steps if steps else 0.0

    @property
    def mean_accepted(self) -> float:
        """τ: tokens committed per verification step (accepted draft tokens + the bonus token)."""
        return float(np.mean(self.accepted_per_step) + 1) if self.accepted_per_step else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def overlap(self) -> float:
        """Share of draft compute hidden behind verification."""
        return self.draft_hidden_s / self.draft_s if self.draft_s > 0 else 0.0

    def acceptance_by_position(self, depth: int) -> list[float]:
        """Share of steps whose i-th draft position (1-based) was accepted."""
        acc = np.asarray(self.accepted_per_step)
        return [float((acc >= i).mean()) if len(acc) else 0.0 for i in range(1, depth + 1)]

    def to_dict(self, depth: int | None = None) -> dict:
        out = asdict(self)
        out.pop("accepted_per_step")
        out.pop("predicted_tokens")
        out.update(mean_accepted=round(self.mean_accepted, 4), tokens_per_s=round(self.tokens_per_s, 4),
                   predicted_per_step=round(self.predicted_per_step, 4),
                   overlap=round(self.overlap, 4),
                   bytes_per_token=round(self.bytes_draft_target / max(self.new_tokens, 1), 2))
        if depth:
            out["acceptance_by_position"] = [round(x, 4) for x in self.acceptance_by_position(depth)]
        return out


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: GenerationStats


# -- a request's stream, as an engine hands it to its driver: Tokens..., then Finished or Failed ----
@dataclass
class Tokens:
    """The tokens one step committed, in order."""

    ids: list[int]


@dataclass
class Finished:
    stats: GenerationStats
    cancelled: bool = False
    generation: int | None = None  # of the worker group (it counts restarts); None in process


@dataclass
class Failed:
    error: str
    generation: int | None = None


def final_stats(event) -> GenerationStats:
    """The statistics of a request's last event; ``EngineError`` if the request failed."""
    if isinstance(event, Failed):
        raise EngineError(event.error)
    return event.stats


def collect(events, on_tokens=None) -> GenerationResult:
    """Drain a request's event stream into its tokens and statistics (``on_tokens`` per step)."""
    tokens: list[int] = []
    for event in events:
        if isinstance(event, Tokens):
            tokens.extend(event.ids)
            if on_tokens:
                on_tokens(event.ids)
        else:
            return GenerationResult(tokens, final_stats(event))
    raise EngineError("the engine ended the request without a result")


class OutputBuffer:
    """A request's output: takes each step's committed tokens, stops at EOS or the token budget."""

    def __init__(self, max_new_tokens: int, eos: set[int], on_tokens=None):
        self.max_new_tokens, self.eos, self.on_tokens = max_new_tokens, eos, on_tokens
        self.tokens: list[int] = []

    def add(self, tokens: list[int]) -> bool:
        """Append tokens up to an EOS or the budget; return True when generation is done."""
        for i, tok in enumerate(tokens):
            if tok in self.eos or len(self.tokens) + i + 1 >= self.max_new_tokens:
                tokens = tokens[: i + 1]
                break
        self.tokens.extend(tokens)
        if self.on_tokens:
            self.on_tokens(tokens)
        return bool(tokens) and (tokens[-1] in self.eos or len(self.tokens) >= self.max_new_tokens)
