"""A request's events, from the coordinator to the process that submitted it, over zmq.

One Ray streaming item per step costs the coordinator and the receiver a core-worker round trip
each (object creation, a gRPC report, a future resolved on the receiver's event loop), on the same
cores the target shards compute on. Here the coordinator pushes each event as one msgpack message
on an ipc PUSH socket (the engine's actors always share the submitter's node); the submitting
process has one PULL socket and one thread that hands each event to its request's ``Feed``.

The Ray call that starts a request stays open until the request ends and returns its last event:
it is the liveness guard. If it fails (the coordinator died), the feed ends with that error.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import secrets
import threading

import zmq

from dovetail.protocol.channel import ipc_address
from dovetail.protocol.messages import ProtocolError, RequestEvent, decode, encode
from dovetail.request import Failed, Finished, GenerationStats, Tokens


def to_message(request_id: str, event) -> RequestEvent:
    if isinstance(event, Tokens):
        return RequestEvent(request_id, "tokens", ids=[int(t) for t in event.ids])
    if isinstance(event, Finished):
        return RequestEvent(request_id, "finished", stats=dataclasses.asdict(event.stats),
                            cancelled=event.cancelled, generation=event.generation)
    return RequestEvent(request_id, "failed", error=event.error, generation=event.generation)


def from_message(msg: RequestEvent):
    if msg.event == "tokens":
        return Tokens(msg.ids)
    if msg.event == "finished":
        return Finished(GenerationStats(**msg.stats), msg.cancelled, msg.generation)
    return Failed(msg.error, msg.generation)


class Publisher:
    """The coordinator's side: one PUSH socket per submitting process, used under a lock (events
    come from the scheduler thread, a request's failure from its own call's thread)."""

    def __init__(self):
        self._sockets: dict[str, zmq.Socket] = {}
        self._lock = threading.Lock()

    def emitter(self, address: str, request_id: str):
        """``emit(event)`` for one request."""
        return lambda event: self.send(address, to_message(request_id, event))

    def send(self, address: str, msg: RequestEvent) -> None:
        data = encode(msg)
        with self._lock:
            socket = self._sockets.get(address)
            if socket is None:
                socket = self._sockets[address] = zmq.Context.instance().socket(zmq.PUSH)
                socket.setsockopt(zmq.LINGER, 1000)  # a last event still goes out when closed
                socket.connect(address)
            socket.send(data)

    def close(self) -> None:
        with self._lock:
            for socket in self._sockets.values():
                socket.close()
            self._sockets.clear()


class Feed:
    """One request's events as they arrive: ``for`` (blocking) or ``async for`` (in a server).
    Ends after ``Finished`` or ``Failed``; ``fail(exc)`` ends it with an exception instead."""

    def __init__(self, on_close):
        self._events: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._on_close = on_close

    def put(self, item) -> None:
        """From the receiving thread (or a Ray callback): an event, or an exception to raise."""
        with self._ready:
            self._events.append(item)
            self._ready.notify()
            loop, wake = self._loop, self._wake
        if loop is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop is closed: nobody is reading any more
                pass

    fail = put

    def _next(self, item):
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self):
        try:
            while True:
                with self._ready:
                    while not self._events:
                        self._ready.wait()
                    item = self._events.popleft()
                event = self._next(item)
                yield event
                if not isinstance(event, Tokens):
                    return
        finally:
            self._on_close()

    async def __aiter__(self):
        with self._ready:
            self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        try:
            while True:
                with self._ready:
                    item = self._events.popleft() if self._events else None
                    if item is None:
                        self._wake.clear()
                if item is None:
                    await self._wake.wait()
                    continue
                event = self._next(item)
                yield event
                if not isinstance(event, Tokens):
                    return
        finally:
            self._on_close()


class Subscriber:
    """The submitting process's side: one PULL socket bound in the engine's run directory, and a
    thread that hands each event to its request's ``Feed`` (events of a feed already closed are
    dropped: its reader went away)."""

    def __init__(self, directory):
        self.address = ipc_address(directory, f"feed-{os.getpid()}-{secrets.token_hex(3)}")
        self._socket = zmq.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.address)
        self._feeds: dict[str, Feed] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, name="dovetail-feed", daemon=True)
        self._thread.start()

    def open(self, request_id: str) -> Feed:
        feed = Feed(lambda: self._drop(request_id))
        with self._lock:
            self._feeds[request_id] = feed
        return feed

    def _drop(self, request_id: str) -> None:
        with self._lock:
            self._feeds.pop(request_id, None)

    def _receive(self) -> None:
        while not self._closed:
            try:
                if not self._socket.poll(200):
                    continue
                data = self._socket.recv()
            except zmq.ZMQError:  # closed under us
                return
            try:
                msg = decode(data)
            except ProtocolError:
                continue
            if not isinstance(msg, RequestEvent):
                continue
            with self._lock:
                feed = self._feeds.get(msg.request_id)
            if feed is not None:
                feed.put(from_message(msg))

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self._socket.close()
