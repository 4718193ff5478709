"""Placement plans: one shard per socket, the draft's own core, impossible plans refused."""

import pytest

from dovetail.errors import UserError
from dovetail.placement import GiB, make_plan
from dovetail.topology import Socket, Topology

TWO_SOCKETS = Topology((Socket(0, (0, 1, 2, 3), 64 * GiB, 0), Socket(1, (4, 5, 6, 7), 64 * GiB, 1)))


def test_one_shard_per_socket_and_a_core_for_the_draft():
    plan = make_plan(TWO_SOCKETS, 6 * GiB, 1 * GiB, memory_available=100 * GiB)
    assert [s.cpus for s in plan.shards] == [(0, 1, 2, 3), (4, 5, 6)]
    assert [s.numa_node for s in plan.shards] == [0, 1]
    assert plan.draft.cpus == (7,) and not plan.draft.shares_cpus
    text = plan.describe()
    assert "target shard 1/2: CPUs 4,5,6 (3 threads), NUMA node 1" in text and "draft: CPUs 7" in text


def test_gpu_draft_leaves_the_cpus_to_the_target():
    gpu = Topology(TWO_SOCKETS.sockets, ("H100",))
    plan = make_plan(gpu, 6 * GiB, 1 * GiB, memory_available=100 * GiB)
    assert plan.draft.device == "cuda" and [len(s.cpus) for s in plan.shards] == [4, 4]


def test_more_shards_split_sockets_evenly():
    plan = make_plan(TWO_SOCKETS, 6 * GiB, None, shards=4, memory_available=100 * GiB)
    assert [s.cpus for s in plan.shards] == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_virtual_single_core_sockets_share_with_the_draft():
    plan = make_plan(Topology((Socket(0, (0,)), Socket(1, (1,)))), GiB, GiB, memory_available=100 * GiB)
    assert plan.draft.shares_cpus and "no overlap possible" in plan.describe()


@pytest.mark.parametrize("kwargs,why", [
    (dict(shards=9), "9 target shards but only 8 CPU core"),
    (dict(shards=3), "cannot be spread evenly"),
    (dict(shards=0), "at least one target shard"),
    (dict(target_bytes=300 * GiB), "needs ~.* GiB of RAM but only 100.0 GiB"),
])
def test_impossible_plans_are_refused(kwargs, why):
    args = dict(target_bytes=6 * GiB, draft_bytes=GiB, memory_available=100 * GiB) | kwargs
    with pytest.raises(UserError, match=why):
        make_plan(TWO_SOCKETS, **args)


def test_a_shard_larger_than_its_numa_node_is_refused():
    small = Topology((Socket(0, (0, 1), 4 * GiB, 0),))
    with pytest.raises(UserError, match="its NUMA node has 4.0 GiB"):
        make_plan(small, 6 * GiB, None, memory_available=100 * GiB)


def test_draft_cpus_can_be_shared_or_chosen():
    shared = make_plan(TWO_SOCKETS, 6 * GiB, GiB, memory_available=100 * GiB, draft_cpus="shared")
    assert shared.draft.shares_cpus and shared.draft.cpus == (4, 5, 6, 7) and len(shared.shards[1].cpus) == 4
    chosen = make_plan(TWO_SOCKETS, 6 * GiB, GiB, memory_available=100 * GiB, draft_cpus="0,1")
    assert chosen.draft.cpus == (0, 1) and chosen.shards[0].cpus == (2, 3)
    with pytest.raises(UserError, match="leaves a target shard without CPUs"):
        make_plan(TWO_SOCKETS, 6 * GiB, GiB, memory_available=100 * GiB, draft_cpus="0-3")


def test_a_two_core_socket_shares_with_the_draft():
    """Carving one of two cores would halve the target's compute; the draft takes turns instead."""
    small = Topology((Socket(0, (0, 1)),), source="test")
    plan = make_plan(small, 6 * GiB, GiB, memory_available=100 * GiB)
    assert plan.draft.shares_cpus and plan.shards[0].cpus == (0, 1)


def test_kv_bytes_and_budget(tmp_path):
    """Keys and values of every layer in fp32, per token; the budget is a share of what the plan leaves free."""
    from dovetail.placement import kv_budget, kv_bytes_per_token
    from tiny_models import tiny_config

    tiny_config("qwen2", layers=3, kv_heads=2).save_pretrained(tmp_path)  # head_dim 64 / 4 heads = 16
    assert kv_bytes_per_token(tmp_path) == 2 * 3 * 2 * 16 * 4
    assert kv_bytes_per_token(tmp_path / "missing") == 0
    plan = make_plan(Topology((Socket(0, (0, 1)),)), GiB, None, memory_available=6 * GiB)
    assert plan.free_bytes == 6 * GiB - plan.shards[0].memory_bytes
    assert kv_budget(plan, share=2) == int(plan.free_bytes * 0.8) // 2


def test_a_big_socket_keeps_a_core_for_the_coordinator_and_server():
    """On sockets of 8+ cores the processes that wake every step get a core of their own; on small
    ones the target keeps every core."""
    big = Topology((Socket(0, tuple(range(16)), 64 * GiB, 0),))
    plan = make_plan(big, 6 * GiB, GiB, memory_available=100 * GiB)
    assert plan.control_cpus == (14,) and plan.draft.cpus == (15,) and plan.shards[0].cpus == tuple(range(14))
    assert "coordinator and server: CPU 14, kept off the target's cores" in plan.describe()
    small = make_plan(TWO_SOCKETS, 6 * GiB, GiB, memory_available=100 * GiB)
    assert small.control_cpus == () and "no reserved CPU" in small.describe()
