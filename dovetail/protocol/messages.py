"""Typed, versioned control messages (msgpack). Arrays travel as ``ArrayRef``s into shared memory.

Every message is a dataclass with a ``KIND`` tag. ``encode`` writes ``{"v", "kind", fields...}``;
``decode`` checks the version, the kind and the field names and types, and raises
``ProtocolError`` (never anything else) on a malformed or unknown message, so a receiver can log
it and carry on.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field

import msgpack

PROTOCOL_VERSION = 4  # 4: PrefillChunk (a prompt prefilled in chunks)


class ProtocolError(ValueError):
    """A message that cannot be decoded: wrong version, unknown kind, missing or mistyped fields."""


@dataclass(frozen=True)
class ArrayRef:
    """Where an array lies: shared-memory segment, byte offset, dtype string, shape."""

    segment: str
    offset: int
    dtype: str
    shape: list[int]


_KINDS: dict[str, type] = {}


def message(kind: str):
    """Class decorator: register a dataclass as the message type for ``kind``."""

    def register(cls):
        cls = dataclass(frozen=True)(cls)
        cls.KIND = kind
        _KINDS[kind] = cls
        return cls

    return register


@message("start")
class StartRequest:
    """Coordinator -> draft and shards: prefill ``prompt`` (shard rank 0 answers ``Accepted``
    with the first token). ``sampling``: SamplingParams fields, the seed always set."""

    request_id: str
    prompt: ArrayRef
    sampling: dict = field(default_factory=dict)


@message("prefill_chunk")
class PrefillChunk:
    """Coordinator -> every shard: prefill one chunk of a prompt (``first``: the request starts
    with it, under ``sampling`` as in ``StartRequest``; ``final``: the prompt is then all in).
    Shard rank 0 answers ``Accepted`` at step 0 for every chunk: with the first token after the
    final one, with no tokens before it."""

    request_id: str
    tokens: ArrayRef
    first: bool = True
    final: bool = True
    sampling: dict = field(default_factory=dict)


@message("propose")
class ProposeTree:
    """Coordinator -> draft: tokens committed since the last proposal; grow the next tree.
    ``features``: for a feature drafter, the target's features before each of those tokens
    (float32 [n, hidden], in shard 0's arena)."""

    request_id: str
    step: int
    new_tokens: list[int]
    features: ArrayRef | None = None
    shape: list[float] | None = None  # the tree's ``TreeShape.fields()``; None: feed the tokens only


@message("propose_batch")
class ProposeBatch:
    """Coordinator -> draft: ``ProposeTree`` for several requests at once, their trees grown
    together where the draft can (one forward per level); one ``TreeProposal`` comes back per request."""

    request_ids: list[str]
    steps: list[int]
    new_tokens: list[list[int]]
    features: list[ArrayRef | None] = field(default_factory=list)  # per request (a feature drafter's)
    shapes: list[list[float] | None] = field(default_factory=list)  # per request, as ``ProposeTree.shape``


@message("predraft")
class Predraft:
    """Coordinator -> draft, while the shards verify: bet on the tree under verification and grow
    the next one. ``settled``: the previous step's outcome when it matched the previous bet."""

    request_id: str
    step: int
    settled: list[int] = field(default_factory=list)
    features: ArrayRef | None = None  # a feature drafter's: the target's features before the settled tokens
    shape: list[float] | None = None  # the next tree's ``TreeShape.fields()``


@message("tree")
class TreeProposal:
    """Draft -> coordinator: a draft tree (node 0 = root) as two int32 arrays in shared memory,
    and for a sampled tree its q (``DraftTree.q_tokens`` int32 / ``q_probs`` float32 [n, K]), for
    a draft model's tree its ``scores`` (float32 [n]);
    ``guess``: the committed tokens it bets on (predraft only); ``compute_s``: draft time."""

    request_id: str
    step: int
    tokens: ArrayRef
    parents: ArrayRef
    guess: list[int] = field(default_factory=list)
    compute_s: float = 0.0
    q_tokens: ArrayRef | None = None
    q_probs: ArrayRef | None = None
    scores: ArrayRef | None = None


@message("verify")
class VerifyTree:
    """Coordinator -> every shard: verify this tree (arrays as in ``TreeProposal``)."""

    request_id: str
    step: int
    tokens: ArrayRef
    parents: ArrayRef
    q_tokens: ArrayRef | None = None
    q_probs: ArrayRef | None = None


@message("verify_batch")
class VerifyBatch:
    """Coordinator -> every shard: verify several requests' trees in one forward (the arrays stay
    where their drafts put them); rank 0 answers one ``Accepted`` per request."""

    request_ids: list[str]
    steps: list[int]
    tokens: list[ArrayRef]
    parents: list[ArrayRef]
    q_tokens: list[ArrayRef | None] = field(default_factory=list)  # per request; None: not sampled
    q_probs: list[ArrayRef | None] = field(default_factory=list)


@message("accepted")
class Accepted:
    """Shard rank 0 -> coordinator: the accepted path (tree nodes), the committed tokens
    (accepted draft tokens + the bonus), and the shard's compute time; for a feature drafter, the
    features of the committed positions (the prompt's after prefill) in the shard's arena."""

    request_id: str
    step: int
    path: list[int]
    tokens: list[int]
    compute_s: float = 0.0
    features: ArrayRef | None = None


@message("end")
class EndRequest:
    """Coordinator -> draft and shards: the request is over (finished, stopped or cancelled);
    free its KV cache now rather than when the next request starts."""

    request_id: str


@message("error")
class ErrorReport:
    request_id: str
    error: str


@message("sync")
class Sync:
    """Coordinator -> worker: answer ``Synced`` from the message loop. A worker that answers has
    handled every earlier message and is not stuck (in a collective, say); the Ray ping cannot
    tell that, since it runs on another thread."""

    token: str


@message("synced")
class Synced:
    token: str


@message("request_event")
class RequestEvent:
    """Coordinator -> the process that submitted the request (``actors/feed.py``): one event of its
    stream. ``event`` is "tokens" (``ids``: the tokens one step committed), "finished" (``stats``:
    the ``GenerationStats`` fields) or "failed" (``error``)."""

    request_id: str
    event: str
    ids: list[int] = field(default_factory=list)
    stats: dict | None = None
    cancelled: bool = False
    error: str = ""
    generation: int | None = None


@message("shutdown")
class Shutdown:
    reason: str = ""


def encode(msg) -> bytes:
    if _KINDS.get(getattr(msg, "KIND", None)) is not type(msg):
        raise ProtocolError(f"not a protocol message: {type(msg).__name__}")
    body = {"v": PROTOCOL_VERSION, "kind": msg.KIND}
    for name in _schema(type(msg))[1]:
        value = getattr(msg, name)
        if isinstance(value, ArrayRef):
            value = value.__dict__
        elif isinstance(value, list) and any(isinstance(v, ArrayRef) for v in value):
            value = [v.__dict__ if isinstance(v, ArrayRef) else v for v in value]
        body[name] = value
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes):
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable message ({type(exc).__name__}: {exc})") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"message must be a map, got {type(body).__name__}")
    if body.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {body.get('v')!r} != {PROTOCOL_VERSION}")
    cls = _KINDS.get(body.get("kind"))
    if cls is None:
        raise ProtocolError(f"unknown message kind {body.get('kind')!r}")
    fields = {k: v for k, v in body.items() if k not in ("v", "kind")}
    return cls(**_check_fields(cls, fields))


@functools.cache
def _schema(cls) -> tuple[dict, dict]:
    """(type hints, declared fields) of a message class, computed once (get_type_hints is slow)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _check_fields(cls, fields: dict) -> dict:
    kind = getattr(cls, "KIND", cls.__name__)
    hints, declared = _schema(cls)
    unknown = set(fields) - set(declared)
    if unknown:
        raise ProtocolError(f"{kind}: unknown fields {sorted(unknown)}")
    out = {}
    for name, f in declared.items():
        if name not in fields:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{kind}: missing field {name!r}")
            continue
        out[name] = _coerce(kind, name, hints[name], fields[name])
    return out


def _coerce(kind: str, name: str, hint, value):
    if isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint):  # optional field
        if value is None:
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if hint is ArrayRef:
        if not isinstance(value, dict):
            raise ProtocolError(f"{kind}.{name}: expected an array reference")
        return ArrayRef(**_check_fields(ArrayRef, value))
    origin = typing.get_origin(hint) or hint
    if origin is list:
        (item,) = typing.get_args(hint) or (object,)
        what = "array references" if item is ArrayRef else getattr(item, "__name__", str(item))
        if not isinstance(value, list):
            raise ProtocolError(f"{kind}.{name}: expected a list of {what}")
        try:
            return value if item is object else [_coerce(kind, name, item, v) for v in value]
        except ProtocolError:
            raise ProtocolError(f"{kind}.{name}: expected a list of {what}") from None
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (int, float, str, dict) and not (isinstance(value, origin) and not isinstance(value, bool)):
        raise ProtocolError(f"{kind}.{name}: expected {origin.__name__}, got {type(value).__name__}")
    return value

