"""``python launch.py bench --suite kernels``: the target's kernels against this machine's roof and
against llama.cpp on the same GGUF file, side by side in one run.

  roof        the int8 multiply-add peak of every kernel path this CPU runs (the extension's own
              probe: independent dpbusd, or maddubs + madd, chains on registers) and the read
              bandwidth of the threads (a sum over 1 GiB)
  curve       the packaged 1.5B target's forward by tokens per forward (1-32, a chain as a
              verification block), after 150, 1,000 and 4,000 tokens of context: ms, the ratio to
              one token, and what the linears' multiply-adds and one token's weight stream
              would take at the roof (so each figure reads as a fraction of it)
  prefill     prompt tokens per second at 512, 1,024 and 4,096 tokens (a fresh cache each)
  llama.cpp   ``llama-bench`` on the same file and threads: ``pp N -d D`` for the same curve,
              ``pp N`` for prefill and ``tg 64 -d D`` for decoding at depth
  7B          with ``--seven-b``: the same curve, and prefill at 512 / 1k, on a Qwen2-7B-shaped file of random
              Q4_K blocks (made once, ~4.4 GB), llama.cpp's ``pp N`` on it, and a *projected*
              speculative rate for a 7B target with the packaged 0.5B draft: the real pair's
              measured acceptance by position (the workloads suite's HumanEval chain:3 row), the
              draft's measured forward and the 7B verify curve

``DOVETAIL_KERNEL_ISA=avx2`` runs Dovetail's AVX2 path on an AVX-512 machine (the roof reports
both). llama.cpp is built once by ``bench/build_llamacpp.sh``; without it its rows are skipped
with a note. JSON and PNG: ``<--results-dir>/<name>.{json,png}``.
"""

from __future__ import annotations

import subprocess
import time

from bench.common import machine_info, say, write_report

DEPTHS = (150, 1000, 4000)
ROWS = (1, 2, 4, 8, 16, 32)
PREFILL = (512, 1024, 4096)
ROWS_7B = (1, 2, 3, 4, 8, 16, 32)  # 2-4: the verification blocks of chain:1-3
PREFILL_7B = (512, 1024)  # 4,096 tokens of a 7B take minutes on a small machine, twice (llama.cpp too)
ACCEPTANCE_ROW = "model chain:3 (former default)"  # in workloads-humaneval.json


def measure_roof() -> dict:
    """The machine's int8 peak per kernel path and its read bandwidth, on torch's threads."""
    import torch

    from dovetail.kernels import ops

    o = ops()
    peaks = {}
    for isa in range(2, o.best_isa() + 1):
        o.roof_int8_macs(isa, 200_000)  # warm up (clocks, thread pool)
        peaks[o.kernel_path_name(isa)] = round(max(o.roof_int8_macs(isa, 2_000_000) for _ in range(3)) / 1e9, 1)
    buffer = torch.ones(1 << 30, dtype=torch.uint8)
    read = o.roof_read_bytes(buffer, 4) / 1e9
    return {"int8_g_macs_per_s": peaks, "read_gb_per_s": round(read, 1), "threads": torch.get_num_threads()}


def _weights(model) -> tuple[int, int]:
    """Packed bytes and multiply-adds per token of the target's quantized linears (LM head included)."""
    from dovetail.models.quantized import QuantLinear

    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    packed = lambda m: sum(t.numel() * t.element_size() for t in (m.q, m.D, m.Dm, m.sc, m.mn))
    return (sum(packed(m) for m in linears),
            sum(m.in_features * m.out_features for m in linears))


def dovetail_prefill(lm, tokens: int) -> float:
    """Prompt tokens per second of one prefill into a fresh cache."""
    import torch

    lm.reset()
    t0 = time.perf_counter()
    with torch.inference_mode():
        lm.extend([1000 + i % 5000 for i in range(tokens)])
    return round(tokens / (time.perf_counter() - t0), 1)


def _llama_failed(exc) -> str:
    note = (f"llama-bench failed (exit {exc.returncode}); its rows are skipped. On a CPU that lists AMX, "
            "LLAMA_NO_AMX=1 builds llama.cpp without its AMX matmul")
    say(note)
    return note


def llama_rows(gguf, threads: int) -> dict:
    from bench.native import llama_bench, llama_cpp_bin

    bin_dir = llama_cpp_bin()
    if bin_dir is None:
        return {"note": "llama.cpp could not be built here: its rows are skipped"}
    out = {"curve_ms": {}, "prefill_tok_s": {}, "decode_tok_s": {}}
    try:
        for depth in DEPTHS:  # llama-bench fills the depth again for every size and repetition: fewer at depth
            sizes, reps = (ROWS, 3) if depth == DEPTHS[0] else ((1, 4, 16), 1)
            rows = llama_bench(bin_dir, gguf, threads, ["-p", ",".join(map(str, sizes)), "-n", "0", "-d", str(depth),
                                                        "-r", str(reps)])
            out["curve_ms"][depth] = {int(r["n_prompt"]): round(r["n_prompt"] / r["avg_ts"] * 1e3, 1) for r in rows}
            say(f"llama.cpp after {depth}: {out['curve_ms'][depth]}")
        rows = llama_bench(bin_dir, gguf, threads, ["-p", ",".join(map(str, PREFILL)), "-n", "0", "-r", "1"])
        out["prefill_tok_s"] = {int(r["n_prompt"]): round(r["avg_ts"], 1) for r in rows}
        for depth in DEPTHS[1:]:
            rows = llama_bench(bin_dir, gguf, threads, ["-p", "0", "-n", "32", "-d", str(depth), "-r", "1"])
            out["decode_tok_s"][depth] = round(rows[0]["avg_ts"], 1)
        say(f"llama.cpp prefill {out['prefill_tok_s']}, decode at depth {out['decode_tok_s']}")
    except subprocess.CalledProcessError as exc:  # a crash loses llama.cpp's rows, not the run
        out["note"] = _llama_failed(exc)
    return out


def seven_b_rows(args, like) -> dict:
    """The 7B shape's curve and prefill (random Q4_K weights: cost, not quality), llama.cpp's on the
    same file, and the projected speculative rate of a 7B target with the packaged draft."""
    import torch

    from bench.native import forward_curve, llama_bench, llama_cpp_bin, random_q4_model
    from dovetail.models.cached_lm import CachedLM
    from dovetail.models.quantized import load_quantized
    from dovetail.store import DEFAULT_DRAFT, GGUF_NAME, ModelStore, resolve_model

    folder = random_q4_model(ModelStore(), like)
    out = {"model": "Qwen2-7B shape, random Q4_K blocks", "curve_ms": {}, "prefill_tok_s": {}}
    lm = CachedLM(load_quantized(folder, "native"))
    out["curve_ms"][150] = forward_curve(lm.model, ROWS_7B, context=150, reps=max(1, args.reps // 2))
    say(f"7B after 150: {out['curve_ms'][150]}")
    for tokens in PREFILL_7B:
        out["prefill_tok_s"][tokens] = dovetail_prefill(lm, tokens)
        say(f"7B prefill {tokens}: {out['prefill_tok_s'][tokens]} tok/s")
    del lm
    draft = load_quantized(resolve_model(DEFAULT_DRAFT), "native")
    draft_ms = forward_curve(draft, (1,), context=150, reps=args.reps)[1]
    del draft
    out["projection"] = project_speculation(out["curve_ms"][150], draft_ms, args.results_dir)
    say(f"7B projection: {out['projection']}")
    bin_dir = None if args.no_llama else llama_cpp_bin()
    if bin_dir is not None:
        threads = torch.get_num_threads()
        try:
            rows = llama_bench(bin_dir, folder / GGUF_NAME, threads, ["-p", "1,4,16", "-n", "0", "-d", "150", "-r", "2"])
            out["llama_cpp_curve_ms"] = {int(r["n_prompt"]): round(r["n_prompt"] / r["avg_ts"] * 1e3, 1) for r in rows}
            rows = llama_bench(bin_dir, folder / GGUF_NAME, threads,
                               ["-p", ",".join(map(str, PREFILL_7B)), "-n", "0", "-r", "1"])
            out["llama_cpp_prefill_tok_s"] = {int(r["n_prompt"]): round(r["avg_ts"], 1) for r in rows}
            say(f"llama.cpp 7B: {out['llama_cpp_curve_ms']}, prefill {out['llama_cpp_prefill_tok_s']}")
        except subprocess.CalledProcessError as exc:
            out["llama_cpp_note"] = _llama_failed(exc)
    return out


def project_speculation(verify_ms: dict, draft_ms: float, results_dir) -> dict:
    """A projection, not a measurement: chain:k with the packaged draft, the draft's k forwards and
    then the target's (k+1)-token verification one after the other on the same cores (no overlap),
    each step committing 1 + (acceptance of positions 1..k) tokens on average."""
    import json
    from pathlib import Path

    source = Path(results_dir) / "workloads-humaneval.json"
    try:
        rows = json.loads(source.read_text())["workloads"]["humaneval"]["rows"]
        acceptance = rows[ACCEPTANCE_ROW]["acceptance_by_position"]
    except (OSError, KeyError, ValueError) as exc:
        return {"note": f"no measured acceptance in {source} ({type(exc).__name__}): run the workloads suite first"}
    alone = 1e3 / verify_ms[1]
    chains = {}
    for k in range(1, min(len(acceptance), 3) + 1):
        tokens = 1 + sum(acceptance[:k])
        step_ms = k * draft_ms + verify_ms[k + 1]
        chains[f"chain:{k}"] = {"tokens_per_step": round(tokens, 3), "step_ms": round(step_ms, 1),
                                "tok_s": round(1e3 * tokens / step_ms, 2)}
    best = max(chains, key=lambda c: chains[c]["tok_s"])
    return {"label": "projection (sequential draft then verify, no overlap)", "acceptance_by_position": acceptance[:3],
            "acceptance_source": f"{source.name}: {ACCEPTANCE_ROW}", "draft_ms_per_token": draft_ms,
            "target_alone_tok_s": round(alone, 2), "chains": chains, "best": best,
            "speedup": round(chains[best]["tok_s"] / alone, 2)}


def run(args) -> int:
    import torch

    from bench.native import forward_curve
    from dovetail.kernels import kernel_path_name
    from dovetail.models.cached_lm import CachedLM
    from dovetail.models.quantized import load_quantized
    from dovetail.store import GGUF_NAME, resolve_model

    target_dir = resolve_model(args.target)
    roof = measure_roof()
    say(f"roof: {roof}")
    lm = CachedLM(load_quantized(target_dir, "native"))
    weight_bytes, macs = _weights(lm.model)
    isa = kernel_path_name()
    peaks = roof["int8_g_macs_per_s"]
    peak = peaks.get(isa, max(peaks.values()))  # the scalar path has no probe of its own
    at_roof = {"one_token_weights_ms": round(weight_bytes / roof["read_gb_per_s"] / 1e6, 1),
               "linears_ms_per_token_at_peak": round(macs / peak / 1e6, 2)}
    report = {"machine": machine_info(), "roof": roof, "settings": {
        "target": args.target, "isa": isa, "threads": torch.get_num_threads(), "reps": args.reps,
        "weights_gb": round(weight_bytes / 1e9, 3), "g_macs_per_token": round(macs / 1e9, 3)},
        "at_roof": at_roof, "dovetail": {"curve_ms": {}, "prefill_tok_s": {}}}
    for depth in DEPTHS:
        curve = forward_curve(lm.model, ROWS, context=depth, reps=args.reps)
        report["dovetail"]["curve_ms"][depth] = curve
        say(f"Dovetail after {depth}: {curve} (x one token: "
             f"{ {n: round(ms / curve[1], 2) for n, ms in curve.items()} })")
    for tokens in PREFILL:
        report["dovetail"]["prefill_tok_s"][tokens] = dovetail_prefill(lm, tokens)
        say(f"Dovetail prefill {tokens}: {report['dovetail']['prefill_tok_s'][tokens]} tok/s")
    base = report["dovetail"]["curve_ms"][DEPTHS[0]]
    report["fractions_of_roof"] = {
        "one_token_of_read_roof": round(at_roof["one_token_weights_ms"] / base[1], 2),
        "linears_at_32_rows_of_int8_peak": round(32 * at_roof["linears_ms_per_token_at_peak"] / base[32], 2),
        "note": "one token: the weight stream at the read roof over the measured forward; 32 rows: the "
                "linears' multiply-adds at the int8 peak over the whole measured forward (a lower bound)"}
    if not args.no_llama:
        report["llama_cpp"] = llama_rows(target_dir / GGUF_NAME, torch.get_num_threads())
    if args.seven_b:
        del lm
        report["7b"] = seven_b_rows(args, target_dir)
    path = write_report(report, args)
    _plot(report, path.with_suffix(".png"))
    say(f"wrote {path}")
    return 0


def _plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"after {depth} tokens of context", report["dovetail"]["curve_ms"][depth],
               report.get("llama_cpp", {}).get("curve_ms", {}).get(depth)) for depth in DEPTHS]
    if "7b" in report:
        panels.append(("7B shape (random Q4_K), after 150", report["7b"]["curve_ms"][150],
                       report["7b"].get("llama_cpp_curve_ms")))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, mine, llama) in zip(axes[0], panels):
        ax.plot(list(mine), list(mine.values()), "o-", label="Dovetail")
        if llama:
            ax.plot(list(llama), list(llama.values()), "s--", label="llama.cpp")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per forward")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"forward cost, {report['settings']['isa']}, {report['settings']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
