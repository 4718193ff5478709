"""A worker's message loop survives malformed, unknown and failing messages, and cleans up."""

import os

import numpy as np
import torch

from dovetail.actors.draft_worker import DraftWorker
from dovetail.actors.worker import DraftSpec
from dovetail.models.tree import TreeShape
from dovetail.protocol import messages as m
from dovetail.protocol.channel import Channel, ipc_address
from dovetail.protocol.shm import PREFIX, ShmArena
from tiny_models import described, tiny_model


def test_draft_worker_loop_survives_bad_messages(tmp_path, caplog):
    tiny_model("llama", seed=3).save_pretrained(tmp_path / "draft")
    address = ipc_address(tmp_path, "draft")
    coordinator = Channel(address, bind=True)
    threads = torch.get_num_threads()
    worker = DraftWorker(DraftSpec(TreeShape.chain(2), "cpu", tuple(os.sched_getaffinity(0)), address,
                                   model=described(tmp_path / "draft", "fp32", "draft")))
    torch.set_num_threads(threads)
    prompts = ShmArena(4096)
    try:
        coordinator.send_raw(b"\xc1 not msgpack")
        coordinator.send_raw(m.msgpack.packb({"v": 1, "kind": "launch_missiles"}))
        coordinator.send(m.Accepted("r", 1, [0], [5]))  # valid, but not a draft's message
        coordinator.send(m.ProposeTree("r", 1, [5]))  # the handler fails: no such request
        error = coordinator.recv(timeout_ms=10_000)
        assert isinstance(error, m.ErrorReport) and error.request_id == "r" and "never started" in error.error
        coordinator.send(m.StartRequest("r2", prompts.put(np.array([4, 5, 6], dtype=np.int32))))
        coordinator.send(m.ProposeTree("r2", 1, [7], shape=[3, 2, 1]))
        tree = coordinator.recv(timeout_ms=10_000)
        assert isinstance(tree, m.TreeProposal) and tree.step == 1 and worker.ping()
        tokens = ShmArena(name=tree.tokens.segment)
        assert tokens.view(tree.tokens).tolist()[0] == 7 and tokens.view(tree.tokens).shape == (3,)
        tokens.close()
        assert any("undecodable" in r.message for r in caplog.records)
        assert any("no handler for accepted" in r.message for r in caplog.records)
        coordinator.send(m.Shutdown("test over"))
        worker._thread.join(10)
        assert not worker.ping()
        assert worker.arena.name not in os.listdir("/dev/shm")
    finally:
        prompts.close()
        coordinator.close()
    assert not [s for s in os.listdir("/dev/shm") if s.startswith(f"{PREFIX}{os.getpid()}_")]
