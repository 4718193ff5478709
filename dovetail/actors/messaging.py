"""How the coordinator talks to its workers: one zmq channel each, replies matched by request and
step, deadlines, and telling a request's own failure from a worker's.

* A request's own: a worker reports an error in that request's computation, a reply misses the
  step deadline, or a message cannot be encoded (``RequestFailure``).
* A worker's: one that is gone (fails a ping, its process died) or stuck (no ``Sync`` answer)
  (``WorkerFailure``): the whole group must be restarted.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import ray

from dovetail.decode import RequestFailure
from dovetail.protocol.channel import Channel, PeerUnavailable
from dovetail.protocol.messages import EndRequest, ErrorReport, ProtocolError, Sync, Synced

PING_EVERY_S = 1.0  # how long a reply may be silent before the coordinator checks the workers are alive
SYNC_DEADLINE_S = 30.0  # after a request failed: how long a worker may take to answer a Sync
SEND_TIMEOUT_MS = int(PING_EVERY_S * 1000)  # a send not taken by then: check the worker is alive


class WorkerFailure(RuntimeError):
    """A draft or shard actor died or is stuck: the worker group must be restarted."""


@dataclass
class Inbox:
    """A channel plus the messages that arrived while the coordinator waited on another one."""

    name: str
    channel: Channel
    actor: object
    pending: list = field(default_factory=list)


class Messaging:
    """The coordinator's side of the channels: ``send`` and ``receive`` are what the loop's
    adapters (``actors/remote.py``) call; the rest is how a failure is told apart and cleaned up.
    Subclasses provide ``shards``, ``draft``, ``poller``, ``spec.step_timeout_s`` and
    ``_failures`` (request id -> a worker's error report); one thread at a time uses them (zmq
    sockets are not thread-safe)."""

    shards: list[Inbox]
    draft: Inbox | None

    def _inboxes(self) -> list[Inbox]:
        return self.shards + ([self.draft] if self.draft else [])

    def send(self, box: Inbox, msg) -> None:
        """Send to a worker; raise ``WorkerFailure`` when any worker has died instead of blocking."""
        while True:
            try:
                return box.channel.send(msg)
            except PeerUnavailable:
                self._check_alive()  # alive but slow to take it: try again
            except (ProtocolError, OverflowError, TypeError, ValueError) as exc:  # say, a sampling value msgpack cannot hold
                raise RequestFailure(getattr(msg, "request_id", ""), f"cannot send {msg.KIND}: {exc}") from None

    def receive(self, box: Inbox, kind: type, request_id: str, step: int):
        """Wait for ``box``'s reply of type ``kind`` for this step. ``RequestFailure`` when a worker
        reported an error for this request or the step deadline passed; ``WorkerFailure`` when a
        worker died."""
        return self._wait(box, lambda m: isinstance(m, kind) and m.request_id == request_id and m.step == step,
                          f"{kind.KIND} (step {step})", request_id, self.spec.step_timeout_s)

    def settle(self, box: Inbox) -> None:
        """Wait until ``box``'s worker has handled every message sent to it so far (a ``Sync``
        round trip; ``WorkerFailure`` if it does not answer within the step deadline). A request's
        own error it reported meanwhile stays for that request's next reply."""
        token = secrets.token_hex(4)
        self.send(box, Sync(token))
        self._wait(box, lambda m: isinstance(m, Synced) and m.token == token, "Sync answer", None,
                   self.spec.step_timeout_s)

    def _wait(self, box: Inbox, match, what: str, request_id: str | None, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while True:
            if request_id is not None and request_id in self._failures:
                raise RequestFailure(request_id, self._failures.pop(request_id))
            for i, msg in enumerate(box.pending):
                if match(msg):
                    del box.pending[i]
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                if request_id is None:
                    raise WorkerFailure(f"{box.name} is stuck: no {what} within {timeout_s:g} s")
                raise RequestFailure(request_id, f"no {what} reply from {box.name} within {timeout_s:g} s")
            ready = dict(self.poller.poll(min(PING_EVERY_S, left) * 1000))
            if not ready:
                self._check_alive()
                continue
            for other in self._inboxes():
                if other.channel.socket in ready:
                    msg = other.channel.recv(timeout_ms=0)
                    if isinstance(msg, ErrorReport):
                        dead = self._dead_workers()  # a peer's death shows up as a collective's error
                        first_line = msg.error.splitlines()[0][:300] if msg.error else "an error"
                        if dead:
                            raise WorkerFailure(f"{', '.join(dead)} died: {other.name} reported {first_line}")
                        self._failures.setdefault(msg.request_id or request_id or "", f"{other.name}: {first_line}")
                    elif msg is not None:
                        other.pending.append(msg)

    def _quiesce(self, request_id: str) -> None:
        """After ``request_id`` failed: free its state in every worker, and make sure each worker's
        loop answers (``WorkerFailure`` if one does not); drop its stray replies."""
        token = secrets.token_hex(4)
        for box in self._inboxes():
            self.send(box, EndRequest(request_id))
            self.send(box, Sync(token))
        for box in self._inboxes():
            self._wait(box, lambda m: isinstance(m, Synced) and m.token == token, "Sync answer", None, SYNC_DEADLINE_S)
        for box in self._inboxes():
            box.pending = [m for m in box.pending if getattr(m, "request_id", None) != request_id]
        self._failures.pop(request_id, None)

    def _check_alive(self) -> None:
        dead = self._dead_workers()
        if dead:
            raise WorkerFailure(f"{', '.join(dead)} died")

    def _dead_workers(self, timeout_s: float = 30.0) -> list[str]:
        """Names of the workers that are gone: no ping answer within ``timeout_s`` (the process
        died or is stuck), or a ping saying that its message loop has ended."""
        boxes = self._inboxes()
        pings = [box.actor.ping.remote() for box in boxes]
        deadline, dead = time.monotonic() + timeout_s, []
        for box, ref in zip(boxes, pings):
            try:
                alive = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.01))
            except Exception:
                alive = False
            if not alive:
                dead.append(box.name)
        return dead
