"""``python launch.py bench --suite actors``: the actor system against the in-process engine.

One run, same prompts (HumanEval through the chat template), greedy:
  inprocess           the in-process engine, all cores, sequential draft then verify (the baseline)
  actors[1 shard, draft takes turns]   same resources as inprocess, across processes (its overhead)
  actors[1 shard, draft on its own core]  the target shard on the rest; pipelining on and off
  actors[2 shards]    the CPUs split into two virtual sockets, one shard each; pipelining on and off

Per configuration it reports tokens/s, tau, a per-step time breakdown (draft the coordinator
waited for, verification, protocol/transfer, idle), the overlap, the bytes moved between draft and
target per token, and each shard's peak RSS. Micro-benchmarks: a hot-path message round trip
(msgpack over zmq ipc + a shared-memory array, between two processes) and a gloo all-reduce of
one hidden-state row. Results: ``bench/results/<name>.json``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import numpy as np

from bench.common import check_decoding_args, humaneval_prompts, machine_info, say, write_report


def run(args) -> int:
    from dovetail.api import Dovetail
    from dovetail.config import engine_config_from_args

    check_decoding_args(args)
    base = engine_config_from_args(args)
    report = {"machine": machine_info(), "settings": {
        "target": base.target, "draft": base.draft, "tree": str(base.tree), "draft_precision": base.draft_precision,
        "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "greedy": True}, "configs": {}}
    report["micro"] = {"message_round_trip_us": message_round_trip_us(),
                       "raw_zmq_round_trip_us": message_round_trip_us(raw=True),
                       "gloo_allreduce_us": allreduce_us("gloo"), "shm_allreduce_us": allreduce_us("shm")}
    say(f"micro: {report['micro']}")

    base.engine = "inprocess"
    dt = Dovetail(base).load()
    prompts = humaneval_prompts(dt.tokenizer, args.prompts)
    reference = _run(report, "inprocess", dt, prompts, None, {"threads": base.threads})
    dt.close()
    del dt

    cpus = sorted(os.sched_getaffinity(0))
    setups = [("1 shard, draft takes turns on all cores", None, "shared", (False,))]
    if len(cpus) > 1:  # the draft's own core named explicitly: "auto" shares sockets under 4 CPUs
        setups.append(("1 shard, draft on its own core", None, str(cpus[-1]), (True, False)))
        setups.append(("2 shards", "|".join(map(str, cpus)), "auto", (True, False)))
    for label, sockets, draft_cpus, pipelines in setups:
        config = engine_config_from_args(args)
        config.engine, config.sockets, config.draft_cpus = "actors", sockets, draft_cpus
        dt = Dovetail(config).load()
        info = _ray_get(dt.engine.coordinator.info.remote(refresh=True))
        for pipeline in pipelines:
            name = f"actors[{label}, pipeline {'on' if pipeline else 'off'}]"
            _run(report, name, dt, prompts, reference, {"plan": info["plan"]}, pipeline=pipeline)
        info = _ray_get(dt.engine.coordinator.info.remote(refresh=True))
        report["configs"][name]["workers_peak_rss_gib"] = {
            worker: round(w["peak_rss"] / 2**30, 2) for worker, w in info["workers"].items()}
        dt.close()
    _ratios(report)
    path = write_report(report, args)
    print(json.dumps({k: {kk: v.get(kk) for kk in ("tokens_per_s", "vs_inprocess", "overlap", "step_ms")}
                      for k, v in report["configs"].items()}, indent=1))
    say(f"wrote {path}")
    return 0


def _ray_get(ref):
    import ray

    return ray.get(ref)


def _run(report, name, dt, prompts, reference, extra, **kw):
    results = [dt.engine.generate(ids, report["settings"]["max_new_tokens"], **kw) for ids in prompts]
    outs = [r.token_ids for r in results]
    tokens, seconds = sum(map(len, outs)), sum(r.stats.total_s for r in results)
    steps = sum(r.stats.steps for r in results)
    entry = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 3),
             "steps": steps, "mean_accepted": round(tokens / max(steps + len(prompts), 1), 3), **extra}
    total = lambda field: sum(getattr(r.stats, field, 0.0) for r in results)  # noqa: E731
    if reference is not None:
        entry["identical_to_inprocess"] = [o == r for o, r in zip(outs, reference)]
        per_step = lambda field: round(1000 * total(field) / max(steps, 1), 2)  # noqa: E731
        exposed_draft = total("draft_wait_s")  # time the coordinator waited on the draft, messages included
        entry["step_ms"] = {
            "total": round(1000 * (seconds - total("prefill_s")) / max(steps, 1), 2),
            "draft_compute": per_step("draft_s"), "draft_waited": round(1000 * exposed_draft / max(steps, 1), 2),
            "verify_compute": per_step("verify_s"), "protocol": per_step("protocol_s")}
        entry["step_ms"]["idle"] = round(entry["step_ms"]["total"] - entry["step_ms"]["verify_compute"]
                                         - entry["step_ms"]["draft_waited"], 2)
        entry["overlap"] = round(total("draft_hidden_s") / max(total("draft_s"), 1e-9), 3)
        entry["bets_held"] = f"{int(total('bets_held'))}/{int(total('bets'))}"
        entry["bytes_per_token"] = round(total("bytes_draft_target") / max(tokens, 1), 2)
        entry["protocol_share"] = round(total("protocol_s") / max(seconds, 1e-9), 4)
    else:
        entry["step_ms"] = {"total": round(1000 * (seconds - total("prefill_s")) / max(steps, 1), 2),
                            "draft_compute": round(1000 * total("draft_s") / max(steps, 1), 2),
                            "verify_compute": round(1000 * total("verify_s") / max(steps, 1), 2)}
    report["configs"][name] = entry
    say(f"{name}: {entry['tokens_per_s']:.2f} tok/s, steps {steps}, step ms {entry['step_ms']}"
         + (f", overlap {entry['overlap']}, bets {entry['bets_held']}, identical "
            f"{sum(entry['identical_to_inprocess'])}/{len(outs)}" if reference is not None else ""))
    return outs


def _ratios(report) -> None:
    base = report["configs"]["inprocess"]["tokens_per_s"]
    for entry in report["configs"].values():
        entry["vs_inprocess"] = round(entry["tokens_per_s"] / base, 3)


# -- micro-benchmarks ------------------------------------------------------------------------------
def _echo(address: str, n: int, raw: bool) -> None:
    from dovetail.protocol.channel import Channel
    from dovetail.protocol.messages import Accepted
    from dovetail.protocol.shm import ShmArena

    channel, arenas = Channel(address, bind=False), {}
    for _ in range(n):
        if raw:
            channel.send_raw(channel.socket.recv())
            continue
        msg = channel.recv()
        arena = arenas.get(msg.tokens.segment) or arenas.setdefault(msg.tokens.segment, ShmArena(name=msg.tokens.segment))
        tokens = arena.view(msg.tokens)
        channel.send(Accepted(msg.request_id, msg.step, [0], [int(tokens[-1])], 0.0))
    for arena in arenas.values():
        arena.close()
    channel.close()


def message_round_trip_us(n: int = 2000, raw: bool = False) -> float:
    """Median round trip of a VerifyTree (4-node tree in shm) and its Accepted reply between two
    processes; ``raw``: the same bytes without encoding, decoding or shm (zmq's own floor)."""
    from dovetail.protocol.channel import Channel, ipc_address
    from dovetail.protocol.messages import VerifyTree, encode
    from dovetail.protocol.shm import ShmArena

    with tempfile.TemporaryDirectory(prefix="dt-") as tmp, ShmArena(1 << 16) as arena:
        address = ipc_address(tmp, "echo")
        channel = Channel(address, bind=True)
        child = mp.get_context("spawn").Process(target=_echo, args=(address, n, raw))
        child.start()
        parents = np.array([-1, 0, 1, 2], dtype=np.int32)
        payload = encode(VerifyTree("r", 0, arena.put(parents), arena.put(parents)))
        times = []
        for step in range(n):
            t0 = time.perf_counter()
            if raw:
                channel.send_raw(payload)
                channel.socket.recv()
            else:
                channel.send(VerifyTree("r", step, arena.put(np.arange(4, dtype=np.int32) + step), arena.put(parents)))
                channel.recv()
            times.append(time.perf_counter() - t0)
        child.join(10)
        channel.close()
    return round(1e6 * statistics.median(times[100:]), 1)


def _allreduce_worker(kind: str, rank: int, group: str, hidden: int, n: int, out) -> None:
    import torch

    torch.set_num_threads(1)
    if kind == "gloo":
        import torch.distributed as dist

        from dovetail.protocol.collectives import TorchDistributedCollective

        dist.init_process_group("gloo", init_method=f"file://{group}", rank=rank, world_size=2)
        collective = TorchDistributedCollective()
    else:
        from dovetail.protocol.collectives import ShmCollective

        collective = ShmCollective(group, 2, rank)
    x = torch.ones(1, hidden)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        collective.all_reduce(x)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(statistics.median(times[50:]))


def allreduce_us(kind: str, hidden: int = 1536, n: int = 1000) -> float:
    """Median all-reduce of one fp32 hidden row between two processes (each layer does two)."""
    from dovetail.protocol.collectives import shm_collective_bytes
    from dovetail.protocol.shm import ShmArena

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="dt-") as tmp, ShmArena(shm_collective_bytes(2)) as arena:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        group = f"{tmp}/init" if kind == "gloo" else arena.name
        procs = [ctx.Process(target=_allreduce_worker, args=(kind, r, group, hidden, n, out)) for r in range(2)]
        for p in procs:
            p.start()
        result = out.get(timeout=120)
        for p in procs:
            p.join(30)
    return round(1e6 * result, 1)
