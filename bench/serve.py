"""``python launch.py bench --suite serve``: the HTTP server under load, one run side by side.

Each configuration is a real ``launch.py serve`` child process; the client streams HumanEval
prompts (token ids through the chat template, greedy) over HTTP and measures:

  single      the prompts one after another: tokens/s, time to first token (TTFT) next to the
              engine's own prefill time for the same request, and the server's overhead per
              streamed token ((client time - engine time) / tokens)
  concurrent  the same prompts all at once: aggregate tokens/s, ratio to single
  speculation (config "defaults, speculation on and off"): ``launch.py serve`` with nothing but
              its target, chat prompts (two HumanEval, two creative) one at a time, greedy and at
              temperature 1.0 (the OpenAI API's default, no seed), each with ``speculate`` true
              and false: decode tokens/s (after the first token) and the ratio on/off
Configurations: the default plan (1 replica, target shard + draft on their own cores) with one
request at a time and with a batch of 4 (trees verified in one forward), and the scaling pairs on
virtual sockets (batch 4): 1 replica on socket "0" -> 2 replicas on "0|1", and 1 shard on "0" ->
2 shards on "0|1". Before the servers, in-process micro-benchmarks time one target forward over
B requests' trees against B separate forwards, and the draft growing B trees together (one
forward per level) against B proposals one after another. Results: ``bench/results/<name>.json``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.common import check_decoding_args, humaneval_prompts, machine_info, write_report

SPECULATION = "defaults, speculation on and off"
CONFIGS = {  # name -> extra `launch.py serve` flags
    SPECULATION: [],
    "default plan, one request at a time (max batch 1)": ["--max-batch", "1"],
    "default plan, max batch 4": ["--max-batch", "4"],
    "1 replica, 1 shard, socket '0'": ["--sockets", "0"],
    "2 replicas, socket '0' | '1'": ["--sockets", "0|1", "--replicas", "2"],
    "1 replica, 2 shards, sockets '0|1'": ["--sockets", "0|1", "--shards", "2"],
}


def stream_request(client, url: str, prompt_ids: list[int], max_tokens: int, **extra) -> dict:
    """One streamed completion over ``client`` (an ``httpx.Client``, kept across requests: a new
    client costs ~25 ms of TLS set-up that no server should be blamed for); client-side times
    and the server's usage extension. ``extra``: more body fields (greedy unless told)."""
    body = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    first, last, usage, text = None, None, None, ""
    with client.stream("POST", url + "/v1/completions", json=body, timeout=3600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                last = time.perf_counter()  # the final (finish_reason) event counts: tokens with no text end a stream too
                if choice["text"]:
                    first = first or last
                    text += choice["text"]
    end = time.perf_counter()
    return {"seconds": end - t0, "ttft_s": first - t0, "streaming_s": last - first, "usage": usage, "text": text}


def overhead_per_token(r: dict) -> float:
    """Server time per streamed token beyond the engine's: from the first token to the final event,
    what the client waited minus what the engine spent decoding (its total minus its prefill)."""
    spec, tokens = r["usage"]["speculative"], r["usage"]["completion_tokens"]
    return (r["streaming_s"] - (spec["total_s"] - spec["prefill_s"])) / max(tokens - 1, 1)


def measure(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    import httpx

    client = httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=len(prompts) + 1))
    stream_request(client, url, prompts[0], 4)  # warm-up: first-request costs are not the steady state
    single = [stream_request(client, url, p, max_tokens) for p in prompts]
    tokens = sum(r["usage"]["completion_tokens"] for r in single)
    overheads = [overhead_per_token(r) for r in single]
    ttft_ratio = [r["ttft_s"] / r["usage"]["speculative"]["prefill_s"] for r in single]
    results: list[dict] = [None] * len(prompts)

    def run(i):
        results[i] = stream_request(client, url, prompts[i], max_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if any(r is None for r in results):
        raise RuntimeError("a concurrent request failed (see the server log)")
    conc_tokens = sum(r["usage"]["completion_tokens"] for r in results)
    single_tps = tokens / sum(r["seconds"] for r in single)
    return {
        "single": {"tokens_per_s": round(single_tps, 3),
                   "ttft_s": [round(r["ttft_s"], 4) for r in single],
                   "ttft_minus_prefill_ms": [round(1000 * (r["ttft_s"] - r["usage"]["speculative"]["prefill_s"]), 2)
                                             for r in single],
                   "prefill_s": [round(r["usage"]["speculative"]["prefill_s"], 4) for r in single],
                   "ttft_over_prefill": round(statistics.mean(ttft_ratio), 4),
                   "overhead_ms_per_token": round(1000 * statistics.mean(overheads), 3),
                   "tau": round(statistics.mean(r["usage"]["speculative"]["mean_accepted"] for r in single), 3)},
        "concurrent": {"requests": len(prompts), "aggregate_tokens_per_s": round(conc_tokens / wall, 3),
                       "vs_single": round(conc_tokens / wall / single_tps, 3),
                       "same_text_as_single": all(a["text"] == b["text"] for a, b in zip(results, single))},
    }


def measure_speculation(url: str, prompts: list[list[int]], max_tokens: int, rounds: int = 2) -> dict:
    """Each prompt with ``speculate`` true and false, alternating (so drift hits both alike), greedy
    and at temperature 1.0; decode tokens/s from the first streamed token to the last."""
    import httpx

    client = httpx.Client(timeout=3600)
    stream_request(client, url, prompts[0], 4)  # warm-up
    out = {}
    for temperature in (0.0, 1.0):
        tokens, seconds = {True: 0, False: 0}, {True: 0.0, False: 0.0}
        for _ in range(rounds):
            for prompt in prompts:
                for speculate in (True, False):
                    r = stream_request(client, url, prompt, max_tokens, temperature=temperature, speculate=speculate)
                    tokens[speculate] += r["usage"]["completion_tokens"] - 1
                    seconds[speculate] += r["streaming_s"]
        rate = {k: tokens[k] / seconds[k] for k in tokens}
        out[f"temperature {temperature}"] = {"speculate_tok_s": round(rate[True], 2),
                                             "target_alone_tok_s": round(rate[False], 2),
                                             "ratio": round(rate[True] / rate[False], 3)}
        print(f"[bench] served, temperature {temperature}: {out[f'temperature {temperature}']}", flush=True)
    return out


def _best_ms(fn, reset, reps: int) -> float:
    """Best of ``reps`` timings of ``fn``, ``reset()`` restoring the caches after each."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        reset()
    return round(1000 * best, 1)


def _batch_curve(what: str, prompts: list, start, separate, together, reps: int) -> dict:
    """``separate(batch)`` against ``together(batch)`` for B = 1..len(prompts), on 1 and 2 threads;
    ``start()`` returns fresh per-request states and a function that restores them."""
    import torch

    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        states, reset = start()
        for batch in range(1, len(prompts) + 1):
            alone = _best_ms(lambda: separate(states[:batch]), reset, reps)
            batched = _best_ms(lambda: together(states[:batch]), reset, reps)
            out[f"{threads} threads, batch {batch}"] = entry = {
                "separate_ms": alone, "batched_ms": batched, "speedup": round(alone / batched, 3)}
            print(f"[bench] {what} {threads} threads, batch {batch}: {entry}", flush=True)
    return out


def batched_verify_ms(target_dir, prompts: list[list[int]], tree_size: int = 4, reps: int = 3,
                      precision: str = "fp32") -> dict:
    """In process, before any server: one target forward over B requests' ``tree_size``-token
    chains (``forward_trees``) against B forwards one after another, at the servers' precision."""
    import numpy as np

    from dovetail.models.cached_lm import CachedLM, forward_trees
    from dovetail.models.loading import load_causal_lm
    from dovetail.models.tree import DraftTree
    from dovetail.describe import describe_model

    model = load_causal_lm(describe_model(target_dir, precision), "mm")  # as the shards load it
    chain = DraftTree(np.arange(100, 100 + tree_size), np.arange(-1, tree_size - 1))

    def start():
        lms = [CachedLM(model) for _ in prompts]
        for lm, prompt in zip(lms, prompts):
            lm.extend(prompt)
        return lms, lambda: [lm.commit([]) for lm in lms]  # drop the pending trees

    return _batch_curve("verify", prompts, start,
                        lambda lms: [lm.forward_tree(chain.tokens, chain.parents, range(tree_size), lm.committed)
                                     for lm in lms],
                        lambda lms: forward_trees(lms, [chain] * len(lms)), reps)


def batched_draft_ms(draft_dir, prompts: list[list[int]], shape: str, precision: str, reps: int = 3) -> dict:
    """In process: the draft growing B requests' trees together (``propose_together``: one forward
    per level) against B proposals one after another, each after 4 newly committed tokens."""
    from dovetail.models.cached_lm import CachedLM
    from dovetail.models.lm_proposer import DraftProposer, propose_together
    from dovetail.models.loading import load_causal_lm
    from dovetail.models.tree import TreeShape
    from dovetail.describe import describe_model

    model = load_causal_lm(describe_model(draft_dir, precision, "draft"))
    committed = [prompt[-4:] for prompt in prompts]  # as if each had just committed these

    def start():
        proposers = [DraftProposer(CachedLM(model), TreeShape.parse(shape)) for _ in prompts]
        for proposer, prompt in zip(proposers, prompts):
            proposer.start(prompt[:-4])
        marks = [p.lm.committed for p in proposers]

        def reset():
            for proposer, mark in zip(proposers, marks):
                proposer.lm.rollback(mark)
                proposer._tree = proposer._grown_ids = None
        return proposers, reset

    return _batch_curve(f"draft {shape}", prompts, start,
                        lambda ps: [p.propose(c) for p, c in zip(ps, committed)],
                        lambda ps: propose_together(ps, committed[:len(ps)]), reps)


def run(args) -> int:
    from dovetail.config import DEFAULT_TREE
    from dovetail.serve.server import ServerProcess
    from dovetail.store import DEFAULT_DRAFT, resolve_model
    from dovetail.models.loading import load_tokenizer
    from dovetail.models.precision import resolve_precision
    from dovetail.models.spec import FLOAT_DEFAULT

    check_decoding_args(args)
    draft = DEFAULT_DRAFT if args.draft == "auto" else args.draft  # the draft that measured fastest (docs/benchmarks.md)
    model_args = ["--target", args.target, "--draft-precision", args.draft_precision]
    no_draft, tree = args.draft is None, str(args.tree) if args.tree else None
    model_args += ["--no-draft"] if no_draft else ["--draft", draft]
    if tree:
        model_args += ["--tree", tree]
    prompts = humaneval_prompts(load_tokenizer(resolve_model(args.target)), args.prompts)
    names = [n for n in CONFIGS if not args.serve_configs or any(s in n for s in args.serve_configs.split(";"))]
    report = {"machine": machine_info(), "settings": {
        "target": args.target, "draft": None if no_draft else draft, "tree": tree or "default",
        "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "greedy": True,
        "queueing": "strict FIFO slots per replica; up to --max-batch requests decode together "
                    "(batch per configuration name; default 4)"}, "configs": {}}
    if not args.no_curves:
        target_dir = resolve_model(args.target)
        precision = resolve_precision(args.target_precision, target_dir, FLOAT_DEFAULT["target"])
        report["settings"]["target_precision"] = precision
        report["batched_verify"] = batched_verify_ms(target_dir, prompts, precision=precision)
        if not no_draft:
            report["batched_draft"] = batched_draft_ms(resolve_model(draft), prompts, tree or str(DEFAULT_TREE),
                                                       args.draft_precision)
    logs = Path(tempfile.mkdtemp(prefix="dovetail-bench-serve-"))
    for i, name in enumerate(names):
        print(f"[bench] {name}: starting the server", flush=True)
        if name == SPECULATION:  # the server's own defaults: the cost model over every proposer
            flags = ["--target", args.target]
            with ServerProcess(flags, logs / f"server{i}.log") as server:
                result = measure_speculation(server.url, _chat_prompts(args), args.max_new_tokens)
            report["configs"][name] = result = {"server_flags": flags, "prompts": 4, **result}
            print(f"[bench] {name}: {json.dumps(result)}", flush=True)
            continue
        with ServerProcess(model_args + CONFIGS[name], logs / f"server{i}.log") as server:
            report["configs"][name] = result = measure(server.url, prompts, args.max_new_tokens)
        print(f"[bench] {name}: {json.dumps(result)}", flush=True)
    _scaling(report["configs"])
    path = write_report(report, args)
    print(f"[bench] wrote {path} (server logs in {logs})")
    return 0


def _chat_prompts(args) -> list[list[int]]:
    """Two HumanEval and two creative chat prompts, as token ids through the chat template."""
    from bench.workloads import CREATIVE
    from dovetail.models.loading import encode_chat, load_tokenizer
    from dovetail.store import resolve_model

    tokenizer = load_tokenizer(resolve_model(args.target))
    return humaneval_prompts(tokenizer, 2) + [encode_chat(tokenizer, text) for text in CREATIVE[:2]]


def _scaling(configs: dict) -> None:
    """Aggregate throughput of the 2-socket configurations relative to the 1-socket one."""
    base = configs.get("1 replica, 1 shard, socket '0'")
    if not base:
        return
    for name, entry in configs.items():
        if "'0|1'" in name or "'0' | '1'" in name:
            entry["aggregate_vs_1_socket"] = round(entry["concurrent"]["aggregate_tokens_per_s"]
                                                   / base["concurrent"]["aggregate_tokens_per_s"], 3)
