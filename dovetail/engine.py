"""The in-process speculative decoding loop and its per-request statistics.

    first = target.start(prompt)            # prefill on the CPU target
    draft.start(prompt)
    loop: tree = draft.propose(new_tokens)  # draft proposes a tree from what was committed
                                            # (a feature drafter also gets the target's features)
          acc  = target.verify(tree)        # one target forward over the tree; accept; commit
          new_tokens = acc.tokens           # accepted draft tokens + one bonus token

The draft and the target share nothing but token ids and tree arrays, which is what lets the
actor system put them in different processes. With no draft, every tree is just the root and
the loop is plain target decoding (speculation off).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from dovetail.errors import UserError
from dovetail.models.lm_proposer import DraftProposer
from dovetail.models.target import TargetVerifier
from dovetail.models.tree import DraftTree
from dovetail.models.verification import SamplingParams


@dataclass
class GenerationStats:
    new_tokens: int = 0
    steps: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    accepted_per_step: list[int] = field(default_factory=list)  # accepted draft tokens per step

    @property
    def mean_accepted(self) -> float:
        """τ: tokens committed per verification step (accepted draft tokens + the bonus token)."""
        return float(np.mean(self.accepted_per_step) + 1) if self.accepted_per_step else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def acceptance_by_position(self, depth: int) -> list[float]:
        """Share of steps whose i-th draft position (1-based) was accepted."""
        acc = np.asarray(self.accepted_per_step)
        return [float((acc >= i).mean()) if len(acc) else 0.0 for i in range(1, depth + 1)]

    def to_dict(self, depth: int | None = None) -> dict:
        out = asdict(self)
        out.pop("accepted_per_step")
        out.update(mean_accepted=round(self.mean_accepted, 4), tokens_per_s=round(self.tokens_per_s, 4))
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


class SpeculativeEngine:
    def __init__(self, target: TargetVerifier, draft: DraftProposer | None, eos_token_ids=()):
        self.target = target
        self.draft = draft
        self.eos = set(int(t) for t in eos_token_ids)

    @property
    def depth(self) -> int:
        return self.draft.shape.depth if self.draft else 0

    def generate(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 speculate: bool = True, on_tokens=None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens (stopping after an EOS token).

        ``on_tokens(list[int])`` is called with each step's newly committed tokens, in order.
        """
        self._validate(prompt_ids, max_new_tokens)
        max_new_tokens = min(max_new_tokens, self.target.context_length - len(prompt_ids))
        draft = self.draft if speculate else None
        stats = GenerationStats()
        t0 = time.perf_counter()
        out = OutputBuffer(max_new_tokens, self.eos, on_tokens)
        commit = out.add

        new_tokens = [self.target.start(prompt_ids, params)]
        features = self.target.prompt_features  # for a feature drafter; None otherwise
        if draft:
            draft.start(prompt_ids)
        stats.prefill_s = time.perf_counter() - t0
        done = commit(new_tokens)
        while not done:
            t1 = time.perf_counter()
            if not draft:
                tree = DraftTree([new_tokens[-1]], [-1])
            else:
                tree = draft.propose(new_tokens, features) if draft.uses_features else draft.propose(new_tokens)
            t2 = time.perf_counter()
            acceptance = self.target.verify(tree)
            stats.draft_s += t2 - t1
            stats.verify_s += time.perf_counter() - t2
            stats.steps += 1
            stats.accepted_per_step.append(acceptance.accepted_draft_tokens)
            new_tokens, features = acceptance.tokens, acceptance.features
            done = commit(new_tokens)
        stats.new_tokens = len(out.tokens)
        stats.total_s = time.perf_counter() - t0
        return GenerationResult(out.tokens, stats)

    def _validate(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        validate_request(prompt_ids, max_new_tokens, self.target.context_length)


def validate_request(prompt_ids: list[int], max_new_tokens: int, context: int) -> None:
    if len(prompt_ids) == 0:
        raise UserError("the prompt is empty")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt_ids) >= context:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens; the target's context is {context}")


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
