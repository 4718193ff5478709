"""One typed configuration for an engine, validated where it enters (CLI, Python API)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

from dovetail.batching import AUTO, MAX_AUTO_BATCH, MIN_GAIN
from dovetail.decode import PREFILL_CHUNK
from dovetail.errors import UserError
from dovetail.models.spec import DEFAULT_CUT, LINEAR_KERNELS, PRECISIONS
from dovetail.models.tree import TreeShape
from dovetail.store import AUTO_DRAFT, DEFAULT_TARGET
from dovetail.topology import default_threads

# A draft proposer's tree when none is pinned for it: the shape that drafts a prototype's warm-up;
# each step's shape is then the cost model's (dovetail/speculation).
DEFAULT_TREE = TreeShape.chain(3)
ENGINES = ("actors", "inprocess", "auto")  # auto: see Dovetail.engine_kind
COLLECTIVES = ("shm", "gloo")


def _option(default=None, help: str = "", factory=None, **cli):
    """An ``EngineConfig`` field and its command-line flag (``cli``: argparse keywords such as
    ``choices``; ``off="--no-x"`` and ``off_help`` add a flag that turns the option off)."""
    meta = {"help": help, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EngineConfig:
    """Every engine option, once: its type, default, check and help. The CLI's flags are made from
    these fields (``add_engine_args``), ``ServeConfig`` embeds one, and the workers get theirs
    from it."""

    target: str = _option(DEFAULT_TARGET, "a packaged model name, a GGUF file, a folder holding one, or an HF "
                                          "model folder")
    draft: str | None = _option(AUTO_DRAFT, "the proposers: 'auto' (a draft model -- the Dovetail drafter "
                                "train-draft made for the target if there is one, else the packaged 0.5B model -- and "
                                "'ngram' and 'suffix', the cost model picking one of them or none every step), "
                                "'ngram', 'suffix', 'dovetail' (that drafter), a drafter folder, a packaged model "
                                "name, a GGUF file (or a folder holding one) or an HF model folder, or several "
                                "joined by '+' (their trees merged every step, e.g. ngram+suffix)",
                                off="--no-draft", off_help="target-only decoding (speculation off)")
    tree: TreeShape | None = _option(None, "pin the tree: TOTAL,DEPTH,TOP_K (e.g. 16,7,10) or chain:K (default "
                                     "'auto': the cost model picks the depth, or no speculation, every step)")
    target_kernel: str = _option("mm", "fp32 targets only: the dense linear kernel", choices=LINEAR_KERNELS)
    target_precision: str = _option("auto", "native: the GGUF's own blocks (auto's choice for packaged models); "
                                    "q4: the GGUF's blocks wider than 4 bits re-encoded to Q4_0/Q4_K at load (for a draft: "
                                    "fewer bytes a level, only acceptance changes); int8/int4: quantized on load from float "
                                    "weights; fp32: dequantized floats "
                                    "(auto's choice for an HF float folder)", choices=PRECISIONS)
    draft_precision: str = _option("auto", "as --target-precision (auto: q4 for a GGUF draft, int8 for an "
                                   "HF float folder)", choices=PRECISIONS)
    draft_vocab: int | str = _option(AUTO, "cut the draft's LM head to the N tokens most frequent in text Dovetail "
                                     "ships (its target's answers, Python source), so a draft level reads fewer "
                                     "bytes; the output never changes. 'auto': a draft model's head to "
                                     f"{DEFAULT_CUT} tokens when its vocabulary is over twice that, a Dovetail "
                                     "drafter's as trained; 0: the whole vocabulary")
    threads: int = _option(help="torch threads of the in-process engine (default: all CPUs; the actor engine "
                           "follows its plan)", factory=default_threads)
    engine: str = _option("auto", "actors: the Ray actor system; inprocess: one process, no Ray; auto: actors "
                          "where the draft can run beside the target (a GPU, a core of its own, several sockets "
                          "or shards), else inprocess", choices=ENGINES)
    sockets: str | None = _option(None, 'virtual sockets as CPU lists, e.g. "0|1" or "0-7|8-15" (default: the '
                                  "machine's NUMA nodes)")
    shards: int | None = _option(None, "target shards (default: one per socket)")
    pipeline: bool = _option(True, "draft the next block while the current one is verified", off="--no-pipeline",
                             off_help="draft only after each verification")
    address: str | None = _option(None, "join this Ray cluster instead of starting one")
    collective: str = _option("shm", "how target shards all-reduce: shared memory or gloo", choices=COLLECTIVES)
    draft_cpus: str = _option("auto", 'without a GPU: "auto" (a core of its own), "shared" (take turns with the '
                              'target) or a CPU list')
    max_batch: int | str = _option(AUTO, "requests decoding together, their trees verified in one target "
                                   "forward: 'auto' picks the largest batch where one request more still adds "
                                   f">= {MIN_GAIN:.0%}% throughput on this machine's measured verify curve, within "
                                   f"the KV memory (at most {MAX_AUTO_BATCH}); N: at most N (1: one at a time)")
    prefill_chunk: int = _option(PREFILL_CHUNK, "a prompt joining running requests is prefilled this many tokens per step, "
                                 "so the others keep streaming (0: whole prompts, at once)")
    kv_memory_mb: int | None = _option(None, "MiB of KV cache the engine's requests may hold at once: the actor "
                                       "engine admits a request only when its worst case (prompt + max tokens) "
                                       "fits, and --max-batch auto fits requests of 2k tokens in it (default: 80%% "
                                       "of the RAM the plan, or the loaded models, leave free)")

    def __post_init__(self):
        if self.tree == "auto":
            self.tree = None
        elif isinstance(self.tree, str):
            self.tree = parse_tree(self.tree)
        elif isinstance(self.tree, dict):  # as asdict() wrote it
            self.tree = TreeShape(**self.tree)
        _one_of("target kernel", self.target_kernel, LINEAR_KERNELS)
        _one_of("target precision", self.target_precision, PRECISIONS)
        _one_of("draft precision", self.draft_precision, PRECISIONS)
        _one_of("engine", self.engine, ENGINES)
        _one_of("collective", self.collective, COLLECTIVES)
        from dovetail.speculation import parse_proposers

        self.proposers = parse_proposers(self.draft)
        self.max_batch = _auto_or_number(self.max_batch, "max_batch")
        self.draft_vocab = _auto_or_number(self.draft_vocab, "draft_vocab")
        for name, low in (("draft_vocab", 0), ("threads", 1), ("max_batch", 1), ("shards", 1), ("kv_memory_mb", 1),
                          ("prefill_chunk", 0)):
            value = getattr(self, name)
            if value is not None and value != AUTO and value < low:
                raise UserError(f"{name} must be >= {low}, got {value}")
        if self.draft_cpus not in ("auto", "shared"):
            from dovetail.topology import parse_cpu_list

            parse_cpu_list(self.draft_cpus)
        if self.sockets is not None:
            from dovetail.topology import parse_sockets

            parse_sockets(self.sockets)


def drafter_vocab(config: EngineConfig) -> int:
    """The Dovetail drafter's head: ``--draft-vocab`` tokens, or as trained (0, what ``auto`` means
    for it)."""
    return 0 if config.draft_vocab == AUTO else config.draft_vocab


def _auto_or_number(value, name: str):
    """An option that is "auto" or a number (a YAML or a flag may give the number as text); its
    bounds are checked with the other numbers'."""
    if value == AUTO or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be 'auto' or a number, got {value!r}") from None


def _one_of(what: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{what} must be one of {allowed}, got {value!r}")


def add_engine_args(parser, **defaults) -> None:
    """One flag per ``EngineConfig`` field (``--target-precision`` for ``target_precision``), with its
    type, choices and help; ``defaults`` overrides a field's default for this command."""
    for f in fields(EngineConfig):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        cli = dict(meta["cli"])
        off, off_help = cli.pop("off", None), cli.pop("off_help", "")
        default = defaults.get(f.name, None if f.default is MISSING else f.default)
        if f.type in ("bool", bool):
            parser.add_argument(off, dest=f.name, action="store_false", default=default, help=off_help)
            continue
        kind = _scalar(f.type)  # checked by EngineConfig itself, with its own messages
        parser.add_argument(flag, dest=f.name, type=kind, default=default, help=meta["help"], **cli)
        if off:
            parser.add_argument(off, dest=f.name, action="store_const", const=None, help=off_help)


def _auto_or_number_flag(text: str):
    """A flag's "auto" or number (its bounds are checked by ``EngineConfig``, with the option's name)."""
    try:
        return _auto_or_number(text, "the value")
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _scalar(annotation) -> type:
    if "int" in str(annotation) and "str" in str(annotation):  # a number or "auto"
        return _auto_or_number_flag
    return int if "int" in str(annotation) else str  # a tree stays text until EngineConfig parses it


def engine_config_from_args(args, **overrides) -> EngineConfig:
    """The ``EngineConfig`` of parsed flags (a flag left unset keeps the field's default)."""
    values = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}
    for f in fields(EngineConfig):  # fields whose default is computed (threads, tree) when not given
        if values.get(f.name) is None and f.default is MISSING:
            values.pop(f.name, None)
    return EngineConfig(**{**values, **overrides})


def parse_tree(text: str) -> TreeShape:
    try:
        return TreeShape.parse(text)
    except ValueError as exc:
        raise UserError(f"bad tree {text!r}: use TOTAL,DEPTH,TOP_K (e.g. 16,7,10) or chain:K ({exc})") from None
