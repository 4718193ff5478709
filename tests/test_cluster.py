"""Dovetail on a real multi-node Ray cluster made on this machine (``ray.cluster_utils.Cluster``):
a head without CPUs (Serve's controller and proxy) and two nodes of one CPU each, each with its
own sockets (``DOVETAIL_SOCKETS`` in the node's environment, as ``ray start`` would pass it).

An engine's actors must all land on the node that built it; Serve replicas spread over the nodes,
each serving exact output; killing one node leaves the other serving.
"""

import threading
import time

import httpx
import pytest
import ray

from dovetail.actors.worker import on_node
from tiny_models import hf_greedy


@ray.remote(num_cpus=0)
class _Driver:
    """A driver process on one node: builds an engine there, as a serving replica would."""

    def run(self, target_dir: str, draft_dir: str, prompts: list[list[int]]):
        from dataclasses import replace

        from dovetail.actors.system import ActorEngine
        from dovetail.describe import describe_model
        from dovetail.actors.worker import current_node
        from dovetail.config import EngineConfig

        config = EngineConfig(target=target_dir, draft=draft_dir, tree="chain:3", draft_precision="fp32")
        target = replace(describe_model(target_dir, "auto"), eos_token_ids=(1,), context_length=2048)
        engine = ActorEngine(target, describe_model(draft_dir, "fp32", "draft"), config)
        try:
            outputs = [engine.generate(p, 24).token_ids for p in prompts]
            info = ray.get(engine.coordinator.info.remote(refresh=True))
            nodes = {"coordinator": info["node_id"], **{name: w["node_id"] for name, w in info["workers"].items()}}
            cpus = {name: w["cpus"] for name, w in info["workers"].items()}
            return {"driver": current_node(), "nodes": nodes, "cpus": cpus, "outputs": outputs,
                    "plan": engine.plan.describe()}
        finally:
            engine.shutdown()


def test_an_engine_keeps_all_its_actors_on_its_node(ray_cluster, served):
    """Drivers on node 1 and on node 2 each build an engine: every actor of each engine (the
    coordinator, the shard, the draft) is on its driver's node, pinned to that node's CPUs (its
    own sockets override), and the output is the target's own greedy output."""
    _, node_ids = ray_cluster
    target, _, root = served
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5]]
    drivers = [_Driver.options(**on_node(node)).remote() for node in node_ids]
    results = ray.get([d.run.remote(str(root / "target"), str(root / "draft"), prompts) for d in drivers])
    for node, cpu, result in zip(node_ids, (0, 1), results):
        assert result["driver"] == node
        assert set(result["nodes"].values()) == {node}, result["nodes"]  # 0 engines split across nodes
        assert all(cpus == [cpu] for cpus in result["cpus"].values()), result["cpus"]
        assert f"override '{cpu}'" in result["plan"]
        assert result["outputs"] == [hf_greedy(target, p, 24, eos=1) for p in prompts]
    for d in drivers:
        ray.kill(d)


def _complete(url: str, prompt: list[int], n: int, timeout: float = 120.0):
    return httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0},
                      timeout=timeout)


@pytest.mark.slow  # a minute: two replicas' engines on one-CPU nodes, then a node loss
def test_replicas_spread_over_nodes_and_survive_a_node_loss(ray_cluster, served):
    """Two Serve replicas land on different nodes (each reserves its node's CPU) and both serve
    exact output; the node of one is killed under load: requests on it end (an error, never a
    hang), the other replica keeps serving exactly, and nothing is left waiting."""
    from ray import serve

    from dovetail.serve.app import build_app
    from dovetail.serve.server import free_port

    made, node_ids = ray_cluster
    target, tokenizer, root = served
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})  # one machine, one port
    try:
        serve.run(build_app({"target": str(root / "target"), "draft": str(root / "draft"), "draft_precision": "fp32",
                             "tree": "chain:3", "replicas": 2}), name="dovetail", route_prefix="/")
        seen: dict[str, str] = {}  # replica -> node
        for _ in range(40):
            health = httpx.get(f"{url}/health", timeout=30).json()
            seen[health["replica"]] = health["node"]
            if len(seen) == 2:
                break
        assert sorted(seen.values()) == sorted(node_ids), seen
        answered: dict[str, int] = {}
        for i in range(12):
            prompt = [5 + i % 7, 6, 7, 8]
            response = _complete(url, prompt, 16)
            assert response.status_code == 200, response.text
            expected = tokenizer.decode(hf_greedy(target, prompt, 16, eos=1), skip_special_tokens=True)
            assert response.json()["choices"][0]["text"] == expected
            replica = response.headers["x-dovetail-replica"]
            answered[replica] = answered.get(replica, 0) + 1
        assert set(answered) == set(seen), answered  # both replicas answered, exactly

        victim_replica, victim_node = next(iter(seen.items()))
        outcomes = []

        def long_request(i):
            t0 = time.monotonic()
            try:
                response = _complete(url, [9, 8, 7, i], 1500, timeout=180)
                outcomes.append((response.status_code, response.headers.get("x-dovetail-replica"),
                                 time.monotonic() - t0))
            except httpx.HTTPError as exc:  # the connection to a dead replica may just close
                outcomes.append((type(exc).__name__, None, time.monotonic() - t0))

        threads = [threading.Thread(target=long_request, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        node = next(n for n in made.worker_nodes if n.node_id == victim_node)
        made.remove_node(node, allow_graceful=False)
        for t in threads:
            t.join(timeout=200)
        assert len(outcomes) == 4 and all(seconds < 180 for _, _, seconds in outcomes), outcomes
        survivor = next(r for r in seen if r != victim_replica)
        assert all(code == 200 for code, replica, _ in outcomes if replica == survivor), outcomes
        assert any(replica != survivor for _, replica, _ in outcomes), "no request was on the killed node"
        for i in range(4):  # the survivor serves every later request, exactly
            prompt = [3 + i, 4, 5]
            response = _complete(url, prompt, 16)
            assert response.status_code == 200, response.text
            assert response.headers["x-dovetail-replica"] == survivor
            expected = tokenizer.decode(hf_greedy(target, prompt, 16, eos=1), skip_special_tokens=True)
            assert response.json()["choices"][0]["text"] == expected
    finally:
        serve.shutdown()


def test_a_node_ledger_hands_out_each_part_once_and_takes_back_dead_claims(ray_cluster):
    """Replicas sharing a node claim distinct parts of it; a claim is idempotent; a full node
    refuses with a reason; the part of a replica that died goes to the next one."""
    from dovetail.serve.slots import NodeSlots

    @ray.remote(num_cpus=0)
    class Replica:
        def me(self):
            return ray.get_runtime_context().get_actor_id()

    _, node_ids = ray_cluster
    ledger = NodeSlots.options(**on_node(node_ids[0])).remote()
    replicas = [Replica.options(**on_node(node_ids[0])).remote() for _ in range(3)]
    a, b, c = ray.get([r.me.remote() for r in replicas])
    assert ray.get([ledger.claim.remote(a, 2), ledger.claim.remote(b, 2), ledger.claim.remote(a, 2)]) == [0, 1, 0]
    with pytest.raises(ray.exceptions.RayTaskError, match="all 2 parts"):
        ray.get(ledger.claim.remote(c, 2))
    ray.kill(replicas[0])
    deadline = time.monotonic() + 60  # the kill takes effect asynchronously: wait until the ledger sees it
    while True:
        try:
            part = ray.get(ledger.claim.remote(c, 2))
            break
        except ray.exceptions.RayTaskError:
            assert time.monotonic() < deadline, "the dead replica's part was never taken back"
            time.sleep(0.1)
    assert part == 0
    ray.get(ledger.release.remote(b))  # a replica that shut down gives its part back
    d = Replica.options(**on_node(node_ids[0])).remote()
    assert ray.get(ledger.claim.remote(ray.get(d.me.remote()), 2)) == 1
    for r in replicas[1:] + [d, ledger]:
        ray.kill(r)
