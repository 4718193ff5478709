"""``python launch.py bench --suite cluster``: serving throughput from 1 to 2 nodes of a Ray cluster.

The cluster is made on this machine (``ray.cluster_utils.Cluster``): a head without CPUs (Serve's
controller and proxy) and two nodes of one CPU each, each with its own sockets override. With
one replica only one node serves; with two, one replica per node. The client is
``bench/serve.py``'s: the prompts one after another, then all at once (4 concurrent clients by
default), greedy, streamed over loopback HTTP. The two "nodes" share this machine's memory
bandwidth, which real nodes would not. Results: ``bench/results/<name>.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from bench.common import check_decoding_args, humaneval_prompts, machine_info, write_report
from dovetail.errors import UserError


@contextlib.contextmanager
def local_cluster(cpus_per_node: list[int], env: dict | None = None, temp_dir: str | None = None):
    """A Ray cluster on this machine, connected: a CPU-less head and one node per entry, node i
    on the next ``cpus_per_node[i]`` CPUs (its ``DOVETAIL_SOCKETS``). Yields (cluster, node ids).

    ``temp_dir`` (Ray's session files; default: a new short folder under the system temp dir,
    removed afterwards) must stay short: Ray's unix sockets live inside it."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    _make_ray_default_temp_dir()
    made_temp = temp_dir is None
    if made_temp:
        temp_dir = tempfile.mkdtemp(prefix="dtc-")

    from dovetail.actors.system import NODE_SOCKETS_ENV

    # a Ray started earlier in this process may have left single-machine (loopback) mode on
    saved = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "1"
    ray_constants.ENABLE_RAY_CLUSTER = True
    from dovetail.serve.server import FRESH_QUEUE_LENGTHS

    env = {"HF_HUB_OFFLINE": "1", FRESH_QUEUE_LENGTHS[0]: FRESH_QUEUE_LENGTHS[1], **(env or {})}
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": env, "temp_dir": temp_dir})
    try:
        first, nodes = 0, []
        for n in cpus_per_node:
            sockets = ",".join(str(c) for c in range(first, first + n))
            nodes.append(made.add_node(num_cpus=n, env_vars={**env, NODE_SOCKETS_ENV: sockets}))
            first += n
        ray.init(address=made.address, logging_level="WARNING")
        yield made, [node.node_id for node in nodes]
    finally:
        ray.shutdown()
        made.shutdown()
        if saved[0] is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if made_temp:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _make_ray_default_temp_dir() -> None:
    """``Cluster`` writes its address into Ray's *default* temp dir (``$RAY_TMPDIR``, else the
    system temp dir, plus ``/ray``) even when given a ``temp_dir`` of its own, and does not make
    that folder: on a machine where Ray never ran it would fail with FileNotFoundError."""
    try:
        from ray._common.utils import get_default_ray_temp_dir
    except ImportError:  # older Ray kept it here
        from ray._private.utils import get_default_ray_temp_dir
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)


def run(args) -> int:
    from ray import serve

    from bench.serve import measure
    from dovetail.models.loading import load_tokenizer
    from dovetail.serve.app import build_app
    from dovetail.serve.server import free_port
    from dovetail.store import DEFAULT_DRAFT, resolve_model

    check_decoding_args(args)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise UserError("the cluster benchmark needs 2 CPUs (one per node)")
    draft = DEFAULT_DRAFT if args.draft == "auto" else args.draft
    app_args = {"target": args.target, "draft": draft, "draft_precision": args.draft_precision}
    prompts = humaneval_prompts(load_tokenizer(resolve_model(args.target)), args.prompts)
    report = {"machine": machine_info(), "settings": {
        "target": args.target, "draft": draft, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
        "greedy": True, "nodes": "2 local Ray nodes of 1 CPU each (plus a CPU-less head); they share this "
                                 "machine's memory bandwidth"}, "configs": {}}
    home = os.environ.get("DOVETAIL_HOME")
    with local_cluster([1, 1], env={"DOVETAIL_HOME": home} if home else None):
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        for replicas in (1, 2):
            name = f"{replicas} node(s), {replicas} replica(s)"
            print(f"[bench] {name}: deploying", flush=True)
            serve.run(build_app({**app_args, "replicas": replicas}), name="dovetail", route_prefix="/")
            report["configs"][name] = result = measure(f"http://127.0.0.1:{port}", prompts, args.max_new_tokens)
            print(f"[bench] {name}: {json.dumps(result)}", flush=True)
            serve.delete("dovetail")
        serve.shutdown()
    one, two = (report["configs"][n]["concurrent"]["aggregate_tokens_per_s"] for n in report["configs"])
    report["aggregate_2_nodes_vs_1"] = round(two / one, 3)
    print(f"[bench] aggregate tokens/s, 2 nodes / 1 node: {report['aggregate_2_nodes_vs_1']}")
    path = write_report(report, args)
    print(f"[bench] wrote {path}")
    return 0

