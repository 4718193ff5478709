"""Where a serving replica runs: its share of its node, and the CPUs it reserves from Ray.

Each node is cut into ``slots`` parts (``Topology.partition``, per node). A replica claims the
lowest free part of its node from that node's ledger, a small named actor, so replicas sharing a
node never pin the same CPUs; the claims of replicas that died are taken back. Every replica also
reserves its part's CPUs from Ray, so Ray places no more replicas on a node than it has parts,
and autoscaling adds them where there is room.
"""

from __future__ import annotations

import ray

from dovetail.actors.worker import current_node, on_node

NAMESPACE = "dovetail"


def _alive(actor_id: str) -> bool:
    from ray._private import state

    return (state.actors(actor_id) or {}).get("State") not in (None, "DEAD")


@ray.remote(num_cpus=0)
class NodeSlots:
    """The parts of one node that live replicas hold."""

    def __init__(self):
        self.holders: dict[int, str] = {}  # part -> the replica actor holding it

    def claim(self, holder: str, slots: int) -> int:
        self.holders = {part: h for part, h in self.holders.items() if h == holder or _alive(h)}
        for part, h in self.holders.items():
            if h == holder:
                return part
        free = [part for part in range(slots) if part not in self.holders]
        if not free:
            raise RuntimeError(f"all {slots} parts of node {current_node()[:12]} are held by live replicas")
        self.holders[free[0]] = holder
        return free[0]

    def release(self, holder: str) -> None:
        self.holders = {part: h for part, h in self.holders.items() if h != holder}


def _ledger():
    node = current_node()
    return NodeSlots.options(name=f"slots-{node}", namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                             **on_node(node)).remote()


def claim_part(slots: int) -> tuple[int, int]:
    """This replica's (part, parts) of its node."""
    return ray.get(_ledger().claim.remote(ray.get_runtime_context().get_actor_id(), slots)), slots


def release_part() -> None:
    try:
        _ledger().release.remote(ray.get_runtime_context().get_actor_id())
    except Exception:  # Ray is going away: the claim dies with the replica anyway
        pass


def cluster_nodes() -> list[dict]:
    """The live nodes with CPUs (Ray must be connected)."""
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def replica_cpus(slots: int) -> float:
    """The CPUs one replica reserves: a ``slots``-th of the smallest node (0 when Ray is not up:
    nothing to reserve against)."""
    if not ray.is_initialized():
        return 0.0
    nodes = cluster_nodes()
    return min(n["Resources"]["CPU"] for n in nodes) / slots if nodes else 0.0
