"""``python launch.py bench --suite load``: Dovetail's server against llama.cpp's ``llama-server`` under
concurrent load, in the manner of vLLM's ``benchmark_serving``: same GGUF file, same thread count.

Systems (real server processes, started one after another, never two at once):
  dovetail            ``launch.py serve --target T --max-batch <max concurrency>``: the cost model
                      picks speculation (or none) every step
  dovetail-no-draft   the same with ``--no-draft``
  llama-server        ``llama-server -m T.gguf -t C -tb C --parallel N -c N*2048``, restarted for each
                      concurrency N so that it has exactly N slots (C: this process's cores)
  llama-server-draft  the same with the packaged 0.5B draft (``-md``, ``draft-simple``, up to 8 draft
                      tokens), only at ``--spec-concurrency`` (default 1)

Each system, at each concurrency N and temperature (0 and 0.8): one warm-up request, then
max(N, --load-requests) requests (rounded up to a multiple of N), at most N in flight, each a
streamed ``/v1/chat/completions`` call with the same messages and body on every server (HumanEval
"complete this function" and creative prompts, interleaved; a system message of its own so that
both chat templates render the same turns; ``max_tokens`` --load-tokens; no ``seed``, as a chat client sends none).
No server is told to ignore EOS: tokens are what each request generated (``usage`` with
``stream_options.include_usage``, else the count of content chunks). Both get ``top_p: 1`` and
``top_k: 0`` (llama-server's defaults are 0.95 and 40); llama-server is also sent
``cache_prompt: false`` (Dovetail keeps no prompt cache across requests) and ``min_p: 0`` (its
default 0.05 would truncate what Dovetail samples in full); Dovetail refuses unknown fields.

Per (system, N, temperature): output tok/s (all completion tokens / first send to last finish),
decode tok/s per stream ((tokens - 1) / first to last content chunk, mean over requests; at N=1
the single-stream rate), TTFT p50/p99 (send to first content chunk), ITL p50/p99 (gaps between
consecutive content chunks; where a request's chunks are fewer than its tokens, each gap is divided
by the request's mean tokens per chunk; ``one_chunk_per_token`` says whether every request streamed
one chunk per token, when ITL is exact), TPOT p50, and the Dovetail/llama-server ratios of output
and per-stream decode tok/s at each N and temperature. A system that fails to start, or whose
requests fail, is a row with ``error`` and its log's tail. JSON and PNG go to
``<--results-dir>/<name>.{json,png}`` (written again after each system).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import humaneval_texts, machine_info, result_path, say, write_report
from dovetail.errors import UserError

SYSTEMS = ("dovetail", "dovetail-no-draft", "llama-server", "llama-server-draft")
TEMPERATURES = (0.0, 0.8)
SLOT_CONTEXT = 2048  # llama-server's context per slot: the longest prompt here plus max tokens fits
LLAMA_DRAFT_MAX = 8
SYSTEM_MESSAGE = "You are a helpful assistant."
LLAMA_ONLY = {"cache_prompt": False, "min_p": 0.0}
WARMUP_TOKENS = 16


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise UserError(f"{flag} needs integers >= 1, got {text!r}")
    return values


def chat_texts(count: int) -> list[str]:
    """``count`` HumanEval prompts and the creative prompts, interleaved (any first few mix both)."""
    from bench.workloads import CREATIVE

    code, creative = humaneval_texts(count), list(CREATIVE)
    out = []
    for i in range(max(len(code), len(creative))):
        out += code[i:i + 1] + creative[i:i + 1]
    return out


def stream_chat(client, url: str, text: str, max_tokens: int, **extra) -> dict:
    """One streamed chat completion over ``client`` (an ``httpx.Client`` shared by all requests):
    send time, the arrival time of every content chunk, end time, the server's ``usage`` and
    (llama-server) ``timings``."""
    body = {"messages": [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": text}],
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}, **extra}
    sent, chunks, usage, timings = time.perf_counter(), [], None, None
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(str(event["error"])[:300])
            usage, timings = event.get("usage") or usage, event.get("timings") or timings
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    chunks.append(time.perf_counter())
    if not chunks:
        raise RuntimeError("a request streamed no content")
    tokens = (usage or {}).get("completion_tokens") or len(chunks)
    return {"sent": sent, "chunks": chunks, "end": time.perf_counter(), "tokens": tokens,
            "prompt_tokens": (usage or {}).get("prompt_tokens"), "counted_by": "usage" if usage else "chunks",
            "usage": usage, "timings": timings}


def _pct(values, q: float):
    import numpy as np

    return round(float(np.percentile(values, q)), 2) if values else None


def summarise(results: list[dict], wall: float) -> dict:
    ttft, itl, tpot, decode = [], [], [], []
    for r in results:
        chunks, tokens = r["chunks"], r["tokens"]
        ttft.append(1e3 * (chunks[0] - r["sent"]))
        span = chunks[-1] - chunks[0]
        if tokens > 1 and span > 0:
            decode.append((tokens - 1) / span)
            tpot.append(1e3 * span / (tokens - 1))
        if len(chunks) > 1:
            scale = (len(chunks) - 1) / (tokens - 1) if tokens > len(chunks) else 1.0
            itl += [1e3 * (b - a) * scale for a, b in zip(chunks, chunks[1:])]
    tokens = sum(r["tokens"] for r in results)
    row = {"requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 2),
           "output_tok_s": round(tokens / wall, 2),
           "decode_tok_s_per_stream": round(sum(decode) / len(decode), 2) if decode else None,
           "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p99": _pct(ttft, 99),
           "itl_ms_p50": _pct(itl, 50), "itl_ms_p99": _pct(itl, 99), "tpot_ms_p50": _pct(tpot, 50),
           "mean_completion_tokens": round(tokens / len(results), 1),
           "mean_prompt_tokens": (round(sum(r["prompt_tokens"] for r in results) / len(results), 1)
                                  if all(r["prompt_tokens"] for r in results) else None),
           "tokens_counted_by": sorted({r["counted_by"] for r in results}),
           "one_chunk_per_token": all(len(r["chunks"]) == r["tokens"] for r in results)}
    spec = [r["usage"]["speculative"]["mean_accepted"] for r in results
            if (r["usage"] or {}).get("speculative", {}).get("mean_accepted")]
    if spec:  # Dovetail's usage extension: tokens per target step
        row["mean_accepted"] = round(sum(spec) / len(spec), 3)
    drafted = sum((r["timings"] or {}).get("draft_n", 0) for r in results)
    if drafted:  # llama-server's timings: drafted and accepted draft tokens
        row["draft_accept_rate"] = round(sum(r["timings"].get("draft_n_accepted", 0) for r in results) / drafted, 3)
    return row


def measure(url: str, texts: list[str], n: int, requests: int, max_tokens: int, body: dict) -> dict:
    """One warm-up request, then ``requests`` requests with at most ``n`` in flight."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    # a connection per request: llama-server closes idle keep-alive connections, which httpx then
    # reports as a failed request; a loopback connect costs well under a millisecond, alike for both
    limits = httpx.Limits(max_connections=n + 1, max_keepalive_connections=0)
    with httpx.Client(timeout=3600, limits=limits) as client:
        stream_chat(client, url, texts[0], WARMUP_TOKENS, **body)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(lambda i: stream_chat(client, url, texts[i % len(texts)], max_tokens,
                                                           **body), range(requests)))
    return summarise(results, max(r["end"] for r in results) - t0)


def _log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def llama_draft_flags(server: Path, draft_gguf: Path, threads: int) -> list[str]:
    """The draft-model flags in the spelling this llama-server lists: ``--spec-type draft-simple`` and
    ``--spec-draft-n-max/-n-min`` in current builds, ``--draft-max/--draft-min`` in older ones."""
    proc = subprocess.run([str(server), "--help"], capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    flags = ["-md", str(draft_gguf)] + (["-td", str(threads)] if "--threads-draft" in text else [])
    if "--spec-type" in text:
        flags += ["--spec-type", "draft-simple"]
    new = "--spec-draft-n-max" in text
    return flags + ["--spec-draft-n-max" if new else "--draft-max", str(LLAMA_DRAFT_MAX),
                    "--spec-draft-n-min" if new else "--draft-min", "0"]


def _systems(args, chosen: list[str], concurrency: list[int], spec_concurrency: list[int], threads: int,
             notes: list[str]) -> dict:
    """name -> (concurrencies, restart per N, make(n, log) -> a ServerProcess not yet entered, command)."""
    from dovetail.models.spec import GGUF_NAME
    from dovetail.serve.server import ServerProcess, free_port
    from dovetail.store import DEFAULT_DRAFT, resolve_model

    out = {}
    flags = ["--target", args.target, "--max-batch", str(max(concurrency))]
    for name, extra in (("dovetail", []), ("dovetail-no-draft", ["--no-draft"])):
        if name in chosen:
            out[name] = (concurrency, False, lambda n, log, f=flags + extra: ServerProcess(f, log),
                         "launch.py serve " + " ".join(flags + extra))
    llamas = [s for s in chosen if s.startswith("llama")]
    if not llamas:
        return out
    if args.no_llama:
        notes.append("llama-server rows skipped: --no-llama")
        return out
    gguf = resolve_model(args.target) / GGUF_NAME
    if not gguf.exists():
        notes.append(f"llama-server rows skipped: {args.target} has no GGUF file")
        return out
    from bench.native import llama_cpp_bin

    bin_dir = llama_cpp_bin()
    if bin_dir is None or not (bin_dir / "llama-server").exists():
        notes.append("llama-server rows skipped: llama.cpp's llama-server could not be built here")
        return out
    server = bin_dir / "llama-server"
    base = ["-m", str(gguf.resolve()), "-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1"]
    for name in llamas:
        extra = []
        if name == "llama-server-draft":
            try:
                extra = llama_draft_flags(server, (resolve_model(DEFAULT_DRAFT) / GGUF_NAME).resolve(), threads)
            except Exception as exc:  # noqa: BLE001 - a note with the reason, not a crash
                notes.append(f"llama-server-draft skipped: {exc}")
                continue

        def make(n, log, extra=extra):
            port = free_port()
            cmd = [str(server), *base, "--parallel", str(n), "-c", str(n * SLOT_CONTEXT), "--port", str(port), *extra]
            return ServerProcess([], log, port=port, command=cmd)

        out[name] = (spec_concurrency if name == "llama-server-draft" else concurrency, True, make,
                     f"{server} {' '.join(base + extra)} --parallel N -c N*{SLOT_CONTEXT}")
    return out


def run_system(name: str, plan, texts: list[str], args, logs: Path, rows: list[dict]) -> None:
    """Every concurrency and temperature of one system, appended to ``rows``."""
    concurrencies, per_n, make, _ = plan
    groups = [[n] for n in concurrencies] if per_n else [concurrencies]
    for group in groups:
        log = logs / f"{name}{'-' + str(group[0]) if per_n else ''}.log"
        say(f"{name}: starting the server{f' with {group[0]} slots' if per_n else ''}")
        try:
            with make(group[0], log) as server:
                for n in group:
                    for temperature in TEMPERATURES:
                        requests = -(-max(n, args.load_requests) // n) * n
                        body = {"temperature": temperature, "top_p": 1.0, "top_k": 0,
                                **(LLAMA_ONLY if name.startswith("llama") else {})}
                        key = {"system": name, "concurrency": n, "temperature": temperature}
                        try:
                            rows.append(row := {**key, **measure(server.url, texts, n, requests,
                                                                 args.load_tokens, body)})
                        except Exception as exc:  # noqa: BLE001 - a row with the error and the log's tail
                            rows.append(row := {**key, "error": f"{type(exc).__name__}: {exc}",
                                                "log_tail": _log_tail(log)})
                        say(f"{name} N={n} T={temperature}: " + json.dumps(
                            {k: v for k, v in row.items() if k not in key and k != "log_tail"}))
        except Exception as exc:  # noqa: BLE001 - the server did not start (its message holds the log's tail)
            say(f"{name}: failed to start: {str(exc).splitlines()[0]}")
            rows += [{"system": name, "concurrency": n, "temperature": None, "error": str(exc)[:200],
                      "log_tail": _log_tail(log)} for n in group]


def ratios(rows: list[dict]) -> list[dict]:
    """Dovetail's rows over llama-server's (and llama-server-draft's) at the same N and temperature."""
    ok = {(r["system"], r["concurrency"], r["temperature"]): r for r in rows if "error" not in r}
    out = []
    for (system, n, t), row in ok.items():
        for peer in ("llama-server", "llama-server-draft"):
            other = ok.get((peer, n, t))
            if system.startswith("dovetail") and other:
                out.append({"system": system, "vs": peer, "concurrency": n, "temperature": t, **{
                    key: round(row[key] / other[key], 3) if row[key] and other[key] else None
                    for key in ("output_tok_s", "decode_tok_s_per_stream")}})
    return out


def run(args) -> int:
    concurrency = _ints(args.concurrency, "--concurrency")
    spec_concurrency = _ints(args.spec_concurrency, "--spec-concurrency")
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else list(SYSTEMS)
    if set(chosen) - set(SYSTEMS) or not chosen:
        raise UserError(f"unknown systems {sorted(set(chosen) - set(SYSTEMS))}; choose from {', '.join(SYSTEMS)}")
    if args.load_requests < 1 or args.load_tokens < 1 or args.prompts < 1:
        raise UserError("--load-requests, --load-tokens and --prompts must be >= 1")
    threads = len(os.sched_getaffinity(0))
    texts = chat_texts(args.prompts)
    notes: list[str] = []
    plans = _systems(args, chosen, concurrency, spec_concurrency, threads, notes)
    for note in notes:
        say(note)
    rows: list[dict] = []
    report = {"machine": machine_info(), "settings": {
        "target": args.target, "threads": threads, "max_tokens": args.load_tokens,
        "requests_per_point": f"max(N, {args.load_requests}) rounded up to a multiple of N",
        "temperatures": list(TEMPERATURES), "concurrency": concurrency, "spec_concurrency": spec_concurrency,
        "prompts": {"humaneval_problems": args.prompts, "texts": len(texts), "system_message": SYSTEM_MESSAGE},
        "llama_only_body": LLAMA_ONLY, "slot_context": SLOT_CONTEXT,
        "systems": {name: plan[3] for name, plan in plans.items()},
        "itl": "gaps between consecutive content chunks, each divided by the request's mean tokens per chunk "
               "where it streamed fewer chunks than tokens"}, "notes": notes, "rows": rows, "ratios": []}
    logs = Path(tempfile.mkdtemp(prefix="dovetail-bench-load-"))
    path = write_report(report, args)
    for name, plan in plans.items():
        run_system(name, plan, texts, args, logs, rows)
        report["ratios"] = ratios(rows)
        path = write_report(report, args)  # after each system: a later failure keeps the earlier rows
        _plot(report, result_path(args, ".png"))
    for r in report["ratios"]:
        say(f"{r['system']} / {r['vs']} N={r['concurrency']} T={r['temperature']}: output "
            f"{r['output_tok_s']}x, per-stream decode {r['decode_tok_s_per_stream']}x")
    say(f"wrote {path} and its .png (server logs in {logs})")
    return 0


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = dict(zip(SYSTEMS, ("#2a7", "#7c4", "#888", "#c63")))
    for system in SYSTEMS:
        for temperature, style in zip(TEMPERATURES, ("-", "--")):
            points = sorted((r["concurrency"], r) for r in report["rows"]
                            if r["system"] == system and r["temperature"] == temperature and "error" not in r)
            if not points:
                continue
            xs, label = [n for n, _ in points], f"{system}, T={temperature}"
            for ax, key in ((ax1, "output_tok_s"), (ax2, "itl_ms_p99")):
                ax.plot(xs, [r[key] for _, r in points], style, marker="o", color=colors[system], label=label)
    for ax, ylabel in ((ax1, "output tokens/s (all requests)"), (ax2, "p99 inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"chat, {report['settings']['max_tokens']} max tokens, {report['settings']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
