"""What every engine offers its drivers (the CLI, the Python API, the Serve app), and the
in-process engine: ``dovetail/decode.py``'s loop over a draft and a target in this process.

With no draft and no model-free proposer, every tree is just the root and the loop is plain
target decoding.
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

from dovetail.batching import BatchChoice, resolve
from dovetail.decode import PREFILL_CHUNK, DecodeLoop
from dovetail.local import LocalProposer, LocalVerifier
from dovetail.speculation import SpeculationSetup, build_speculator, stats_depth
from dovetail.models.target import TargetVerifier
from dovetail.request import GenerationResult, Request, Tokens, check_request, collect
from dovetail.sampling import SamplingParams


@runtime_checkable
class Engine(Protocol):
    def submit(self, request: Request) -> Iterator:
        """The request's events: ``Tokens`` per step, then ``Finished`` or ``Failed``."""

    def cancel(self, request_id: str) -> None:
        """Stop a request after its current step (or before it starts)."""

    def close(self) -> None: ...


class Generates:
    """``generate``: a request's whole answer, for engines that implement ``submit``."""

    def generate(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 speculate: bool = True, on_tokens=None, pipeline: bool | None = None) -> GenerationResult:
        """Up to ``max_new_tokens`` tokens (stopping after an EOS token); ``on_tokens(list[int])``
        gets each step's newly committed tokens, in order."""
        return collect(self.submit(Request(list(prompt_ids), max_new_tokens, params, speculate, pipeline)), on_tokens)


class SpeculativeEngine(Generates):
    """The loop in this thread. The draft and the target take turns on the same cores here, so a
    bet would cost draft time without hiding any: ``betting`` is off unless asked for."""

    def __init__(self, target: TargetVerifier, draft=None, eos_token_ids=(), betting: bool = False,
                 max_batch: int | str = 1, setup: SpeculationSetup | None = None, kv_cap: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        """``target`` and ``draft`` are prototypes: each request gets a fresh copy (its own KV cache).
        ``setup``: the model-free proposers and the cost model (default: the draft alone, its own
        tree every step, as pinned by ``draft.shape``). ``max_batch``: a number, or "auto"
        (``dovetail/batching.py``: from the verify curve, within ``kv_cap`` requests)."""
        self.target, self.draft = target, draft
        self.setup = setup or SpeculationSetup(shape=draft.shape if draft is not None else None)
        self.eos = set(int(t) for t in eos_token_ids)
        self.context_length = target.context_length
        verifier = LocalVerifier(target.fresh)
        self.speculator = build_speculator(LocalProposer(draft.fresh) if draft is not None else None, self.setup,
                                           verifier, self.context_length,
                                           reads_features=draft is not None and draft.reads_features, bets=betting)
        self.batch: BatchChoice = resolve(max_batch, verifier, self.context_length, self.setup.cost_key, kv_cap,
                                          self.setup.say or (lambda msg: None))
        self.loop = DecodeLoop(self.speculator, verifier, self.eos, self.context_length, max_batch=self.batch.size,
                               betting=betting, prefill_chunk=prefill_chunk)
        self._events: dict[str, list] = {}

    @property
    def max_batch(self) -> int:
        return self.loop.max_batch

    @property
    def info(self) -> dict:
        """What the engine runs with: its batch and why."""
        return self.batch.as_dict()

    @property
    def depth(self) -> int:
        return stats_depth(self.setup.shape) if self.speculator else 0

    def submit(self, request: Request) -> Iterator:
        """Decode as the stream is read. Streams read in turn (in one thread) share the loop's batch."""
        check_request(request.prompt_ids, request.max_new_tokens, self.context_length)
        rid = request.request_id
        events = self._events[rid] = []
        try:
            while self.loop.room < 1:
                self.loop.step()
            self.loop.admit(request, events.append)
            while True:
                while events:
                    event = events.pop(0)
                    yield event
                    if not isinstance(event, Tokens):
                        return
                self.loop.step()
        finally:
            self._events.pop(rid, None)
            if any(lv.rid == rid for lv in self.loop.live):  # the reader went away: end it next step
                self.loop.cancelled[rid] = True

    def generate_batch(self, requests: list[Request]) -> list[GenerationResult]:
        """Several requests decoded together, up to ``max_batch`` at a time."""
        for request in requests:
            check_request(request.prompt_ids, request.max_new_tokens, self.context_length)
        events = {request.request_id: [] for request in requests}
        self.loop.run(requests, lambda request: events[request.request_id].append)
        return [collect(events[request.request_id]) for request in requests]

    def cancel(self, request_id: str) -> None:
        self.loop.cancelled[request_id] = True

    def close(self) -> None:
        pass
