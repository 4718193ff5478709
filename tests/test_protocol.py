"""Protocol: msgpack round trips, malformed messages, shared-memory views, zmq channels."""

import logging
import os
import subprocess
import sys
import textwrap
import time

import msgpack
import numpy as np
import pytest

from dovetail.protocol import messages as m
from dovetail.protocol.channel import Channel, PeerUnavailable, ipc_address
from dovetail.protocol.shm import ShmArena, remove_orphaned_segments, segment_names as _segments


@pytest.fixture
def arena():
    before = _segments()
    with ShmArena(4096) as a:
        yield a
    assert _segments() == before  # nothing leaked


def test_messages_round_trip(arena):
    ref = arena.put(np.arange(5, dtype=np.int64))
    for msg in (m.StartRequest("r1", ref, {"temperature": 0.5}), m.ProposeTree("r1", 3, [4, 5, 6]),
                m.PrefillChunk("r1", ref, True, False, {"temperature": 0.5}), m.PrefillChunk("r1", ref, False, True),
                m.ProposeBatch(["r1", "r2"], [3, 1], [[4, 5], [6]]),
                m.TreeProposal("r1", 3, ref, ref), m.TreeProposal("r1", 3, ref, ref, q_tokens=ref, q_probs=ref),
                m.VerifyBatch(["r1", "r2"], [3, 1], [ref, ref], [ref, ref], [None, ref], [None, ref]),
                m.Accepted("r1", 3, [0, 2], [7, 8]),
                m.ErrorReport("r1", "boom"), m.Shutdown()):
        assert m.decode(m.encode(msg)) == msg


def test_a_sampled_tree_travels_with_its_q(arena):
    from dovetail.actors.worker import put_tree, read_tree
    from dovetail.models.tree import DraftTree

    q_tokens = np.array([[4, 9, 0], [0, 0, 0], [0, 0, 0]])
    q_probs = np.array([[0.7, 0.3, 0.0], [0, 0, 0], [0, 0, 0]], dtype=np.float32)
    for tree in (DraftTree([1, 4, 9], [-1, 0, 0]), DraftTree([1, 4, 9], [-1, 0, 0], q_tokens, q_probs)):
        refs = put_tree(arena, tree)
        msg = m.decode(m.encode(m.VerifyTree("r", 1, **refs)))
        back = read_tree(arena.view, msg.tokens, msg.parents, msg.q_tokens, msg.q_probs)
        assert back.tokens.tolist() == [1, 4, 9] and back.parents.tolist() == [-1, 0, 0]
        assert back.sampled == tree.sampled
        if tree.sampled:
            assert back.q_tokens.tolist() == q_tokens.tolist() and np.array_equal(back.q_probs, q_probs)


@pytest.mark.parametrize("payload,why", [
    (b"\xc1garbage", "undecodable"),
    (msgpack.packb([1, 2]), "must be a map"),
    (msgpack.packb({"v": 99, "kind": "shutdown"}), "protocol version"),
    (msgpack.packb({"v": m.PROTOCOL_VERSION, "kind": "launch_missiles"}), "unknown message kind"),
    (msgpack.packb({"v": m.PROTOCOL_VERSION, "kind": "propose", "request_id": "r", "step": 1}), "missing field 'new_tokens'"),
    (msgpack.packb({"v": m.PROTOCOL_VERSION, "kind": "propose", "request_id": "r", "step": "1", "new_tokens": []}), "expected int"),
    (msgpack.packb({"v": m.PROTOCOL_VERSION, "kind": "propose_batch", "request_ids": ["r"], "steps": [1], "new_tokens": [[1, "2"]]}),
     "list of list"),
    (msgpack.packb({"v": m.PROTOCOL_VERSION, "kind": "propose", "request_id": "r", "step": 1, "new_tokens": ["a"]}), "list of int"),
    (msgpack.packb({"v": m.PROTOCOL_VERSION, "kind": "accepted", "request_id": "r", "step": 1, "path": [], "tokens": [],
                    "extra": 1}), "unknown fields"),
    (msgpack.packb({"v": m.PROTOCOL_VERSION, "kind": "tree", "request_id": "r", "step": 1, "tokens": 5, "parents": 5}),
     "array reference"),
])
def test_malformed_messages_raise_protocol_error(payload, why):
    with pytest.raises(m.ProtocolError, match=why):
        m.decode(payload)


def test_arena_views_are_zero_copy_and_read_only(arena):
    tokens = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    ref = arena.put(tokens)
    reader = ShmArena(name=arena.name)
    view = reader.view(ref)
    assert np.array_equal(view, tokens) and not view.flags.writeable
    arena.put(np.zeros(1, dtype=np.int64))  # a later write elsewhere leaves the view intact
    assert np.array_equal(view, tokens)
    del view
    reader.close()
    with pytest.raises(ValueError, match="outside the arena"):
        arena.view(m.ArrayRef(arena.name, 4000, "<i8", [100]))
    with pytest.raises(PermissionError):
        ShmArena(name=arena.name).put(tokens)


def test_arena_wraps_around(arena):
    refs = [arena.put(np.full(100, i, dtype=np.float32)) for i in range(20)]
    assert min(r.offset for r in refs) == 0 and max(r.offset for r in refs) + 400 <= arena.size
    assert np.all(arena.view(refs[-1]) == 19)


def test_orphaned_segments_of_a_killed_owner_are_removed():
    code = textwrap.dedent("""
        import os, signal
        from multiprocessing import resource_tracker
        from dovetail.protocol.shm import ShmArena
        a = ShmArena(1024)
        print(a.name, flush=True)
        # The worst crash: Python's resource tracker (which would unlink leaked segments at
        # exit) is killed too, as when a whole actor process group is SIGKILLed.
        os.kill(resource_tracker._resource_tracker._pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    name = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    assert name in _segments()
    assert name in remove_orphaned_segments()
    assert name not in _segments()


def test_segments_of_another_pid_namespace_are_never_swept(tmp_path):
    """/dev/shm shared with a container: a segment whose pid is invisible here, but which names
    another PID namespace, belongs to a live engine there and stays; one of ours is swept."""
    from dovetail.protocol import shm

    dead = 2**22 + 12345  # above any pid_max: no such process here
    foreign = tmp_path / f"{shm.PREFIX}{dead}_{'f' * 8}_0a0b0c0d"
    ours = tmp_path / f"{shm.PREFIX}{dead}_{shm.PID_NAMESPACE}_0a0b0c0e"
    foreign.write_bytes(b"x")
    ours.write_bytes(b"x")
    assert remove_orphaned_segments(str(tmp_path)) == [ours.name]
    assert foreign.exists() and not ours.exists()


def test_channel_round_trip_and_malformed_message_is_dropped(tmp_path, caplog):
    address = ipc_address(tmp_path, "link")
    server, client = Channel(address, bind=True), Channel(address, bind=False)
    try:
        client.send(m.ProposeTree("r", 1, [1, 2]))
        assert server.recv(timeout_ms=2000) == m.ProposeTree("r", 1, [1, 2])
        with caplog.at_level(logging.ERROR, logger="dovetail.protocol"):
            client.send_raw(b"not msgpack at all \xc1")
            assert server.recv(timeout_ms=2000) is None
        assert "malformed message" in caplog.text
        client.send(m.Shutdown("done"))  # the channel still works afterwards
        assert server.recv(timeout_ms=2000) == m.Shutdown("done")
        assert server.recv(timeout_ms=10) is None  # timeout
    finally:
        server.close()
        client.close()


def test_send_to_a_gone_peer_raises_instead_of_blocking(tmp_path):
    """A PAIR socket whose peer closed (a killed worker) blocks zmq's send forever: a channel with
    a send timeout raises ``PeerUnavailable`` instead (the coordinator then checks its workers)."""
    address = ipc_address(tmp_path, "link")
    server = Channel(address, bind=True, send_timeout_ms=100)
    client = Channel(address, bind=False)
    try:
        server.send(m.Shutdown("hello"))
        assert client.recv(timeout_ms=2000) == m.Shutdown("hello")
        client.close()
        with pytest.raises(PeerUnavailable, match="shutdown message"):
            for _ in range(200):  # the disconnect reaches zmq's io thread within a few ms
                server.send(m.Shutdown("anyone?"))
                time.sleep(0.01)
    finally:
        server.close()
        client.close()


def test_an_arena_dev_shm_has_no_room_for_is_refused_clearly(monkeypatch):
    import os

    from dovetail.protocol import shm

    class Tiny:
        f_bavail, f_frsize = 16, 4096  # 64 KiB free

    monkeypatch.setattr(os, "statvfs", lambda path: Tiny())
    with pytest.raises(MemoryError, match="MiB free"):
        shm.ShmArena(1 << 20)
    with shm.ShmArena(1 << 12) as small:  # what fits is made as usual
        assert small.size >= 1 << 12
