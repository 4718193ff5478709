"""What the HTTP edge of a replica checks and queues before the engine sees a request: body
size and schema, loopback-only routes, FIFO admission by batch slots and KV bytes, the record of
one request on its way (``Job``), and the error bodies and headers of every response.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
import time

import ray
from fastapi import Request
from pydantic import ValidationError

from dovetail.sampling import SamplingParams
from dovetail.serve.schema import ApiError

def replica_name() -> str:
    """The Serve replica this process runs (its id), or "local" outside Serve."""
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "local"


def install_handlers(app, log, retry_after_s: int) -> None:
    """Every error gets an OpenAI-style body (never a bare 500 for a client's mistake), and every
    response names the replica that answered (``X-Dovetail-Replica``; logs carry the same id)."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from dovetail.serve import side_calls

    @app.middleware("http")
    async def name_the_replica(request: Request, call_next):
        response = await call_next(request)
        response.headers["x-dovetail-replica"] = replica_name()
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        side_calls.count_error(exc.status)
        headers = {"Retry-After": str(retry_after_s)} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return await api_error(request, ApiError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return await api_error(request, ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error"))


def replica_grpc_on_loopback() -> None:
    """Ray Serve starts an inter-deployment gRPC server in every replica, bound to all interfaces
    with no setting to change it. On a loopback-only node (the local Ray Dovetail starts) bind it
    to loopback too; on a cluster node, where other nodes may call it, leave it. Must run in the
    replica before Serve calls ``_on_initialized``, i.e. in the deployment's ``__init__``."""
    from ray._common.network_utils import is_localhost
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "loopback", False) or not is_localhost(ray.util.get_node_ip_address()):
        return

    def loopback(server, address: str):
        return original(server, address.replace("[::]:", "127.0.0.1:", 1))

    loopback.loopback = True
    replica.add_port_to_grpc_server = loopback


def local_only(request: Request) -> None:
    """``/health`` and ``/metrics`` need no key, so they answer loopback clients only (a 403
    otherwise), even when ``--host`` opens the API to the network."""
    try:
        address = ipaddress.ip_address(request.client.host if request.client else "")
        local = address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)
    except ValueError:
        local = False
    if not local:
        raise ApiError(403, f"{request.url.path} answers loopback clients only", code="forbidden",
                       kind="permission_error")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed ``limit`` bytes (from its
    Content-Length before anything is read, else while it streams in)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body ({int(declared)} bytes) exceeds the limit of {limit} bytes",
                       code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(request: Request, model, limit: int):
    """The body as ``model``: 413 past ``limit`` bytes; 400 for malformed JSON, wrong types,
    unknown fields, bad values."""
    body = await read_body(request, limit)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = "request body is not valid JSON" if first["type"] == "json_invalid" else first["msg"]
        raise ApiError(400, f"{param}: {message}" if param else message, param=param,
                       code=first["type"]) from None
    except (UnicodeDecodeError, RecursionError):
        raise ApiError(400, "request body is not valid JSON", code="json_invalid") from None


class FifoAdmission:
    """Admission to the engine, strictly in arrival order: a request needs one of ``slots`` (the
    engine's batch) and its worst-case KV bytes out of ``budget``. ``async with admission.take(cost):``
    waits its turn; a waiter that is cancelled (its client left) gives up its place, or what it had
    just been handed."""

    def __init__(self, slots: int, budget: int):
        self.slots, self.budget = slots, budget
        self.waiters: deque = deque()  # (future, cost), oldest first

    def fits(self, cost: int) -> bool:
        return self.slots > 0 and cost <= self.budget

    @asynccontextmanager
    async def take(self, cost: int):
        if not self.waiters and self.fits(cost):
            self.slots, self.budget = self.slots - 1, self.budget - cost
        else:
            turn = asyncio.get_running_loop().create_future()
            self.waiters.append((turn, cost))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release(cost)  # it arrived as we were cancelled: pass it on
                else:
                    self.waiters.remove((turn, cost))
                    self._grant()  # a large request at the head may have held back smaller ones
                raise
        try:
            yield
        finally:
            self._release(cost)

    def _release(self, cost: int) -> None:
        self.slots, self.budget = self.slots + 1, self.budget + cost
        self._grant()

    def _grant(self) -> None:
        """Hand slots to the oldest waiters while the one at the head fits (no overtaking)."""
        while self.waiters and self.fits(self.waiters[0][1]):
            turn, cost = self.waiters.popleft()
            if not turn.done():
                self.slots, self.budget = self.slots - 1, self.budget - cost
                turn.set_result(None)


@dataclass
class Job:
    """One request on its way through the replica."""

    rid: str
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    speculate: bool
    stop: list[str]
    kv_bytes: int  # worst case (prompt + max_tokens): what admission reserves
    client_id: str | None = None  # the request's X-Request-Id (the client's, else Serve's): logged, never the engine's key
    tenant: str = ""  # the body's ``user``: drafts reuse earlier outputs of the same user only (the suffix cache)
    arrival: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float | None = None
    first_token: float | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stats: object = None
