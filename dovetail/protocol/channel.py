"""pyzmq ipc channels carrying encoded protocol messages (one PAIR socket per peer link).

A malformed or unknown message is logged as an error and dropped: ``recv`` returns ``None``
for it, so a bad peer never crashes the receiving actor. A PAIR socket whose peer has gone (its
process died) blocks ``send`` forever; a channel made with ``send_timeout_ms`` raises
``PeerUnavailable`` instead, so its owner can check on the peer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq

from dovetail.protocol.messages import ProtocolError, decode, encode

log = logging.getLogger("dovetail.protocol")


class PeerUnavailable(ConnectionError):
    """No peer took the message within the channel's send timeout (it is gone, or not yet there)."""


def ipc_address(directory: str | Path, name: str) -> str:
    return f"ipc://{Path(directory) / name}.sock"


class Channel:
    """One end of a link: ``bind=True`` on the side that lives longer (the coordinator)."""

    def __init__(self, address: str, bind: bool, context: zmq.Context | None = None,
                 send_timeout_ms: int | None = None):
        self.address = address
        self._socket = (context or zmq.Context.instance()).socket(zmq.PAIR)
        self._socket.setsockopt(zmq.LINGER, 0)
        if send_timeout_ms is not None:
            self._socket.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        (self._socket.bind if bind else self._socket.connect)(address)

    @property
    def socket(self) -> zmq.Socket:
        """The zmq socket (for a ``zmq.Poller`` watching several channels)."""
        return self._socket

    def send(self, msg) -> None:
        try:
            self._socket.send(encode(msg), copy=False)
        except zmq.Again:
            raise PeerUnavailable(f"no peer on {self.address} took a {msg.KIND} message") from None

    def recv(self, timeout_ms: int | None = None):
        """The next message; ``None`` on timeout or when the message was malformed (logged)."""
        if timeout_ms is not None and not self._socket.poll(timeout_ms):
            return None
        data = self._socket.recv(copy=True)
        try:
            return decode(data)
        except ProtocolError as exc:
            log.error("dropped a malformed message on %s: %s", self.address, exc)
            return None

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (tests use it to inject malformed messages)."""
        self._socket.send(data)

    def close(self) -> None:
        self._socket.close(linger=0)
