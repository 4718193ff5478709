"""Python API: load a target/draft pair once, then generate text from prompts.

    from dovetail.api import Dovetail
    dt = Dovetail()                        # the packaged default pair, fetched on first use
    out = dt.generate("def fib(n):", max_new_tokens=64)
    out["text"], out["stats"]["mean_accepted"]
"""

from __future__ import annotations

import sys
import threading
import time

import torch
from transformers import AutoConfig

from dovetail.batching import AUTO
from dovetail.config import EngineConfig, drafter_vocab
from dovetail.decode import freeze_loaded_heap
from dovetail.engine import SpeculativeEngine
from dovetail.request import GenerationResult, Request, RequestError, check_request, collect
from dovetail.errors import UserError
from dovetail.models.cached_lm import CachedLM
from dovetail.models.drafter_net import load_drafter, shared_frozen_tensors
from dovetail.store import is_drafter_dir
from dovetail.models.lm_proposer import DraftProposer, DraftVocab
from dovetail.models.feature_proposer import FeatureDraftProposer
from dovetail.models.loading import describe_draft_vocabulary, draft_vocabulary, encode_chat, load_causal_lm, load_tokenizer
from dovetail.models.precision import gguf_formats
from dovetail.models.spec import GGUF_PRECISIONS, QUANTIZED, ModelSpec
from dovetail.models.target import TargetVerifier
from dovetail.sampling import SamplingParams
from dovetail.config import DEFAULT_TREE
from dovetail.speculation import SpeculationSetup
from dovetail.describe import describe_model, with_head_cut, with_weights
from dovetail.store import AUTO_DRAFT, ModelStore, float_weights, resolve_draft, resolve_model


def _log(msg: str) -> None:
    print(f"[dovetail] {msg}", file=sys.stderr, flush=True)


class Dovetail:
    """Resolves and fetches the models and loads the tokenizer at once; loads the weights on
    ``load()`` or the first generation, so bad input can be refused before the slow part."""

    def __init__(self, config: EngineConfig | None = None, store: ModelStore | None = None, verbose: bool = True,
                 partition: tuple[int, int] = (0, 1)):
        """``partition``: this engine's share of the machine, part i of n (a serving replica's)."""
        index, count = partition
        if count < 1 or not 0 <= index < count:
            raise UserError(f"partition must be (index, count) with 0 <= index < count, got {partition}")
        self.config, self.partition = config or EngineConfig(), partition
        self._say = _log if verbose else (lambda msg: None)
        self.target_dir = resolve_model(self.config.target, store)
        self.proposers = self.config.proposers
        self.draft_dir = (resolve_draft(self.proposers.model, self.config.target, store)
                          if self.proposers.model is not None else None)
        self.feature_drafter = self.draft_dir is not None and is_drafter_dir(self.draft_dir)
        self.tokenizer = load_tokenizer(self.target_dir)
        self.target_config = AutoConfig.from_pretrained(self.target_dir)
        # each model resolved once (precision, EOS, context); its weights are made ready on load()
        self.target: ModelSpec = describe_model(self.target_dir, self.config.target_precision, "target",
                                                self.tokenizer, weights=False, store=store)
        self.draft: ModelSpec | None = (describe_model(self.draft_dir, self.config.draft_precision, "draft",
                                                       weights=False, store=store)
                                        if self.draft_dir is not None and not self.feature_drafter else None)
        if self.draft is not None and self.config.draft_vocab not in (AUTO, 0) and self.draft.precision not in QUANTIZED:
            raise UserError(f"--draft-vocab cuts a quantized draft's head; this draft runs in {self.draft.precision}")
        self.store = store
        self._engine: SpeculativeEngine | None = None
        self._loading = threading.Lock()

    @property
    def engine(self) -> SpeculativeEngine:
        if self._engine is None:
            self.load()
        return self._engine

    def load(self) -> "Dovetail":
        with self._loading:  # threads sharing one Dovetail load it once
            return self._load()

    def _load(self) -> "Dovetail":
        if self._engine is not None:
            return self
        if self.draft is not None:
            self.draft = with_head_cut(self.draft, self.draft_head_tokens, self.target_dir.name, self._say)
        if self.engine_kind() == "actors":
            return self._load_actors()
        cfg = self.config
        torch.set_num_threads(cfg.threads)
        t0 = time.perf_counter()
        self._ready_weights()
        target_model = load_causal_lm(self.target, cfg.target_kernel)
        draft = None
        if self.feature_drafter:
            frozen = shared_frozen_tensors(target_model) if self.target_precision == "fp32" else None
            drafter = load_drafter(self.draft_dir, self.target_float_weights, frozen=frozen,
                                   draft_vocab=drafter_vocab(self.config), precision=cfg.draft_precision)
            draft = FeatureDraftProposer(CachedLM(drafter), cfg.tree or DEFAULT_TREE)
        elif self.draft is not None:
            draft_model = load_causal_lm(self.draft)
            vocab = self._draft_vocabulary(draft_model.config.vocab_size)
            draft = DraftProposer(CachedLM(draft_model), cfg.tree or DEFAULT_TREE, vocab)
        target = TargetVerifier(CachedLM(target_model, keep_hidden=self.feature_drafter))
        self._engine = SpeculativeEngine(target, draft, self.eos_token_ids, max_batch=cfg.max_batch,
                                         setup=self.speculation_setup(), kv_cap=self._kv_cap(),
                                         prefill_chunk=cfg.prefill_chunk)
        self._engine.generate([0, 1], 2)  # warm up kernels and allocations before the first request
        freeze_loaded_heap()
        self._say(f"target {cfg.target} ({self.precision_label('target')}); {self.speculation_label}; "
                  f"{cfg.threads} threads; loaded in {time.perf_counter() - t0:.1f}s")
        self._say_batch()
        return self

    def _kv_cap(self) -> int | None:
        """In process: how many typical requests' KV caches fit --kv-memory-mb, or the RAM left free
        after loading."""
        from dovetail.batching import TYPICAL_REQUEST_TOKENS, kv_cap
        from dovetail.placement import KV_SHARE_OF_FREE, MiB, available_memory, kv_bytes_per_token

        per_token = kv_bytes_per_token(self.target.folder) + (
            kv_bytes_per_token(self.draft.folder) if self.draft is not None else 0)
        budget = self.config.kv_memory_mb * MiB if self.config.kv_memory_mb else available_memory() * KV_SHARE_OF_FREE
        return kv_cap(int(budget), min(TYPICAL_REQUEST_TOKENS, self.context_length) * per_token)

    def _say_batch(self) -> None:
        info = self._engine.info
        self._say(f"batches of up to {info['max_batch']} request(s): {info['max_batch_why']}")

    def _ready_weights(self) -> None:
        """Make the weights every process loads from (a GGUF folder's fp32 conversion, once), here in
        the driver, before any worker starts."""
        self.target = with_weights(self.target, self.store)
        if self.draft is not None:
            self.draft = with_weights(self.draft, self.store)

    @property
    def target_float_weights(self) -> str:
        """The target's float weights folder: a feature drafter takes its embedding and head from it."""
        return self.target.weights if self.target.precision == "fp32" else str(float_weights(self.target_dir, self.store))

    @property
    def target_precision(self) -> str:
        return self.target.precision

    @property
    def draft_precision(self) -> str:
        return self.draft.precision if self.draft is not None else self.config.draft_precision

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.target.eos_token_ids)

    def _draft_vocabulary(self, draft_vocab_size: int) -> DraftVocab:
        """The draft model's ids it may propose (its tokenizer checked against the target's), reported."""
        vocab = draft_vocabulary(self.tokenizer, load_tokenizer(self.draft_dir), self.target_config.vocab_size,
                                 draft_vocab_size)
        self._say(describe_draft_vocabulary(vocab))
        return vocab

    @property
    def draft_head_tokens(self) -> int:
        """How many tokens the draft model's head keeps (0: all): ``--draft-vocab``, whose ``auto``
        cuts a quantized draft's large vocabulary to ``DEFAULT_CUT``."""
        if self.draft is None:
            return 0
        if self.config.draft_vocab == AUTO:
            return self.draft.default_head_cut
        return self.config.draft_vocab

    def speculation_setup(self) -> SpeculationSetup:
        """The proposers besides the draft model, and the cost model's cache key: the curve it
        measures depends on the machine, the models, their precision, the kernels and threads."""
        from dovetail.kernels import build_id

        cfg = self.config
        key = {"target": str(self.target_dir), "target_precision": self.target_precision,
               "draft": str(self.draft_dir), "draft_precision": self.draft_precision,
               "draft_vocab": self.draft_head_tokens or drafter_vocab(cfg), "kernels": build_id(),
               "engine": self.engine_kind(), "threads": cfg.threads, "shards": cfg.shards,
               "sockets": cfg.sockets, "partition": list(self.partition), "draft_cpus": cfg.draft_cpus}
        return SpeculationSetup(self.proposers.text, self.proposers.combined, cfg.tree, key, self._say)

    @property
    def speculation_label(self) -> str:
        """What drafts, in words: ``draft ... + ngram + suffix, tree chosen per step by the cost model``."""
        if not self.proposers.any:
            return "no draft (target-only decoding)"
        names = ([self.draft_label] if self.draft_dir is not None else []) + list(self.proposers.text)
        how = ("trees merged every step" if self.proposers.combined else "one chosen per step") if len(names) > 1 else ""
        tree = f"tree {self.config.tree}" if self.config.tree else "tree chosen per step by the cost model"
        return f"draft {' + '.join(names)}" + (f" ({how})" if how else "") + f", {tree}"

    def engine_kind(self) -> str:
        """``engine="auto"`` (the CLI's ``generate`` default) runs the actor system only where its
        processes can work at once: a GPU or a core of its own for the draft, several sockets or
        shards. Otherwise the draft would take turns with the target on the same cores, and one
        process does exactly that with no messaging (measured faster on a 2-core machine)."""
        cfg = self.config
        if cfg.engine != "auto":
            return cfg.engine
        from dovetail.actors.system import resolve_topology
        from dovetail.placement import CARVE_MIN_CPUS

        topology = resolve_topology(cfg.sockets, self.partition)
        parallel = (topology.gpus or len(topology.sockets) > 1 or (cfg.shards or 1) > 1 or cfg.address
                    or cfg.draft_cpus not in ("auto", "shared")
                    or (self.draft_dir is not None and cfg.draft_cpus == "auto"
                        and max(len(s.cpus) for s in topology.sockets) >= CARVE_MIN_CPUS))
        return "actors" if parallel else "inprocess"

    def _load_actors(self) -> "Dovetail":
        from dovetail.actors.system import ActorEngine

        cfg = self.config
        t0 = time.perf_counter()
        vocab = self._draft_vocabulary(self.draft.vocab_size) if self.draft is not None else None
        self._engine = ActorEngine(self.target, self.draft, cfg, vocab, self._say, partition=self.partition,
                                   setup=self.speculation_setup(),
                                   drafter_dir=self.draft_dir if self.feature_drafter else None)
        self._say(f"actor engine up in {time.perf_counter() - t0:.1f}s: target {cfg.target} "
                  f"({self.precision_label('target')}, {len(self._engine.plan.shards)} shard(s)), "
                  + self.speculation_label
                  + ((", pipelining " + ("on" if self._engine.pipeline else
                                         "off (the draft shares the target's CPUs)" if cfg.pipeline else "off"))
                     if self.draft_dir else ""))
        self._say_batch()
        return self

    def close(self, graceful: bool = True) -> None:
        """Release the engine (stops the actor system, if any)."""
        if self._engine is not None and hasattr(self._engine, "shutdown"):
            self._engine.shutdown(graceful)
        self._engine = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(graceful=exc_type is not KeyboardInterrupt)  # Ctrl-C: stop now, still clean up

    @property
    def draft_label(self) -> str:
        """Which draft proposes: the Dovetail feature drafter (and its folder) or a draft model."""
        if self.feature_drafter:
            cut = drafter_vocab(self.config)
            vocab = f", head cut to {cut} tokens" if cut else ""
            precision = "fp32" if self.config.draft_precision == "fp32" else "int8"
            return f"Dovetail drafter {self.draft_dir} ({precision}{vocab})"
        name = self.draft_dir.name if self.proposers.model == AUTO_DRAFT else self.proposers.model
        cut = self.draft_head_tokens
        return f"{name} ({self.precision_label('draft')}" + (f", head cut to {cut:,} tokens)" if cut else ")")

    def precision_label(self, role: str) -> str:
        """What runs, in words: ``native GGUF (Q4_K, Q6_K), avx512-vnni kernels`` or ``fp32, mm linears``."""
        precision = getattr(self, f"{role}_precision")
        if precision == "fp32":
            return "fp32, " + (f"{self.config.target_kernel} linears" if role == "target" else "dense")
        from dovetail.kernels import kernel_path_name

        if precision in GGUF_PRECISIONS:
            formats = ", ".join(gguf_formats(getattr(self, f"{role}_dir")))
            blocks = f"native GGUF ({formats})" if precision == "native" else \
                f"GGUF ({formats}) re-encoded to 4-bit blocks at load"
            return f"{blocks}, {kernel_path_name()} kernels"
        return f"{precision} quantized on load, {kernel_path_name()} kernels"

    @property
    def context_length(self) -> int:
        return self.target.context_length

    def check_request(self, prompt_ids: list[int], max_new_tokens: int | None) -> None:
        """Refuse a request before any model work (``dovetail.request.check_request``)."""
        check_request(prompt_ids, max_new_tokens, self.context_length)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if not prompt or not prompt.strip():
            raise RequestError("the prompt is empty", param="prompt")
        if chat:
            if not self.tokenizer.chat_template:
                raise UserError(f"target {self.config.target} has no chat template; drop --chat")
            return encode_chat(self.tokenizer, prompt)
        return self.tokenizer.encode(prompt)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int | None = None,
                     params: SamplingParams = SamplingParams(), speculate: bool = True,
                     on_tokens=None) -> GenerationResult:
        """``max_new_tokens=None``: until an EOS token or the end of the context."""
        if max_new_tokens is None:
            max_new_tokens = max(1, self.context_length - len(prompt_ids))
        return collect(self.submit(Request(list(prompt_ids), max_new_tokens, params, speculate)), on_tokens)

    def submit(self, request: Request):
        """The request's events (``dovetail.engine.Engine``): ``Tokens`` per step, then ``Finished``
        or ``Failed``."""
        return self.engine.submit(request)

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)

    def generate(self, prompt: str, max_new_tokens: int | None = None, params: SamplingParams = SamplingParams(),
                 chat: bool = False, speculate: bool = True, on_tokens=None) -> dict:
        """The CLI's ``--json`` object: text, token ids, prompt ids and statistics."""
        prompt_ids = self.encode(prompt, chat)
        self.check_request(prompt_ids, max_new_tokens)
        result = self.generate_ids(prompt_ids, max_new_tokens, params, speculate, on_tokens)
        return {
            "text": self.tokenizer.decode(result.token_ids, skip_special_tokens=True),
            "token_ids": result.token_ids,
            "prompt_token_ids": prompt_ids,
            "stats": result.stats.to_dict(self.engine.depth if speculate else 0),
        }
