"""Dovetail's benchmarks, run from a checkout: ``python launch.py bench --suite ...``.

    __init__.py the command line and the suite table: each suite is ``bench/<suite>.py`` with ``run(args)``
    common.py   what the suites share: machine info, HumanEval prompts, argument checks, reports
    native.py   Dovetail on the packaged GGUF files against llama.cpp on the same files
    humaneval.py  fp32 HF baselines (target alone, assisted generation) against Dovetail's trees
                and trained drafters, with HF's forward-cost curves
    actors.py   the actor system against the in-process engine
    serve.py    the HTTP server: TTFT, per-token overhead, concurrency, replicas and shards
    load.py     the HTTP server under 1-16 concurrent chat streams against llama.cpp's llama-server
                (with and without its draft model) on the same GGUF file: tok/s, TTFT, ITL
    cluster.py  serving on a two-node Ray cluster made on this machine: 1 -> 2 nodes
    workloads.py  what users run (chat, code editing, 4k context, multi-turn, sampling): the cost
                model's defaults against the target alone and llama.cpp's proposers
    profile.py  the target's forward by operator (linears by format, quantization, norms,
                rotary, attention, glue) at 1-16 rows
    kernels.py  the target's forward cost, prefill and decoding at depth against the machine's
                roof and llama.cpp on the same file
    sampling.py warping and drawing one vocabulary row (temperature, top-k, top-p) against HF's warpers

This module stays light (no torch): ``launch.py`` imports it to build its command line, and a
suite's module is imported only when that suite runs.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_TREES = ("chain:3", "chain:5", "4,2,2", "8,4,2")
HELP = "benchmarks: Dovetail against llama.cpp and HF on the same files, the actors, the server"
SUITES = {  # --suite name -> its help; the suite is the module bench/<name>.py, run by its run(args)
    "native": "Dovetail on the packaged GGUF files vs llama.cpp on the same files (methods: llama,"
              "dovetail_inprocess,dovetail_actors,curves,ttft and the slow fp32,7b)",
    "humaneval": "fp32 methods side by side",
    "actors": "the actor system vs the in-process engine",
    "serve": "the HTTP server (TTFT, overhead per token, concurrency, replicas/shards scaling)",
    "load": "the server under concurrent chat streams vs llama-server on the same GGUF (tok/s, TTFT, ITL)",
    "cluster": "serving on 1 then 2 nodes of a local two-node Ray cluster",
    "workloads": "chat, code editing, long context, multi-turn and sampling against the target alone and llama.cpp",
    "profile": "the target's forward by operator at 1-16 rows",
    "kernels": "forward cost by tokens at 150/1k/4k context, prefill and the machine's roof, against llama.cpp",
    "draft": "the draft's cost against its acceptance, by head cut (--draft-vocab: whole, 16k, 32k, 48k) and precision (q4)",
    "sampling": "warping and drawing one 151,936-token row, by temperature, top-k and top-p, against HF's warpers",
}
DEFAULT_SUITE = "native"


def add_bench_args(p) -> None:
    from dovetail.config import add_engine_args

    add_engine_args(p)
    p.add_argument("--prompts", type=int, default=10, help="number of HumanEval problems (from the first)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--trees", default=";".join(DEFAULT_TREES), help="';'-separated tree shapes for Dovetail runs")
    p.add_argument("--methods", default="target,hf_assisted,dovetail", help="comma-separated subset")
    p.add_argument("--no-curves", action="store_true", help="skip the forward-cost curves")
    p.add_argument("--suite", choices=tuple(SUITES), default=DEFAULT_SUITE,
                   help="; ".join(f"{name}{' (default)' if name == DEFAULT_SUITE else ''}: {text}"
                                  for name, text in SUITES.items()))
    p.add_argument("--workloads", default="", help="workloads suite: comma-separated subset (default: all)")
    p.add_argument("--context-tokens", type=int, default=4000, help="workloads suite: the long-context prompt's size")
    p.add_argument("--no-llama", action="store_true", help="workloads, kernels and load suites: skip llama.cpp's rows")
    p.add_argument("--seven-b", action="store_true",
                   help="kernels suite: also a 7B-shaped random Q4_K file (made once, ~4.4 GB): its curve, prefill "
                        "and a projected speculative rate with the packaged draft")
    p.add_argument("--serve-configs", default="",
                   help="serve suite: ';'-separated substrings picking configurations (default: all)")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="load suite: comma-separated concurrent requests")
    p.add_argument("--spec-concurrency", default="1",
                   help="load suite: the concurrencies at which llama-server-draft runs (comma-separated)")
    p.add_argument("--systems", default="",
                   help="load suite: comma-separated subset of dovetail,dovetail-no-draft,llama-server,"
                        "llama-server-draft (default: all)")
    p.add_argument("--load-requests", type=int, default=8,
                   help="load suite: requests per point, at least the concurrency (rounded up to a multiple of it)")
    p.add_argument("--load-tokens", type=int, default=128, help="load suite: max_tokens of each request")
    p.add_argument("--reps", type=int, default=7, help="profile, kernels and sampling suites: repetitions per point (medians)")
    p.add_argument("--name", default=None, help="results file stem (default: the suite)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help=f"where results go (default: {RESULTS_DIR})")
    p.add_argument("--drafters", default="",
                   help="';'-separated Dovetail drafter folders (or 'dovetail') to run with --drafter-trees")
    p.add_argument("--drafter-trees", default="16,7,10;7,4,10;chain:3;chain:5",
                   help="';'-separated tree shapes for the drafters")
    p.add_argument("--drafter-vocabs", default="0",
                   help="';'-separated head cuts for each drafter (0: as trained); the first tree runs with each")
    p.add_argument("--sampled", type=float, default=0.0,
                   help="also run the draft model's first tree and each drafter's first tree at this temperature")


def run(args) -> int:
    args.name = args.name or args.suite
    return import_module(f"bench.{args.suite}").run(args)
