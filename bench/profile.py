"""``python launch.py bench --suite profile``: where a target forward's time goes, by operator, at 1-16 rows.

The packaged target (its GGUF blocks through the lean forward, as ``generate`` runs it) verifies
chains of 1, 2, 4, 8 and 16 rows after a 150-token prefix and after a 4,000-token one, the way a
speculative step does. Every
call into the compiled kernels is timed through a proxy around ``dovetail.kernels.ops()`` and
attributed to:

  linear <role> <format>   each projection by role (q/k/v/o, gate/up/down, the LM head) and block
                           format, with its bytes and multiply-adds (so GB/s and G MAC/s)
  quantize activations     the int8 quantization of a linear's input rows (shared by q/k/v and
                           by gate/up)
  norms                    RMSNorm, fused with the residual add
  rotary, attention        the rotary embedding, the attention over the cache and the tree
  torch + Python           what is left of the forward's wall time: the embedding, SiLU, the KV
                           cache update, the mask, Python between the calls (and what a native
                           decoder layer does between the operators above)

Each figure is the median over ``--reps`` forwards (default 7); ``extra_ms``
is the cost over the 1-row forward, which is where the extra rows go.

``pages``: the same target loaded twice in one process, its packed weights on huge pages (the
default, ``kernels/arena.py``) and on 4 KiB pages (``DOVETAIL_HUGE_PAGES=0``), decoding one token
at a time in alternating rounds, so the two medians share the host's noise. JSON:
``<--results-dir>/<name>.json``.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import numpy as np

from bench.common import machine_info, one_token_ms, say, write_report

ROWS = (1, 2, 4, 8, 16)
PREFIX = 150
LONG_PREFIX = 4000
CATEGORY = {"quantize_rows": "quantize activations", "rms_norm": "norms", "add_rms_norm_": "norms",
            "rope_": "rotary", "row_attention": "attention"}
GLUE = "torch + Python"
LAYER = "decoder_layers"  # the native decoder (fast_forward): one call, timed by operator inside


class TimedOps:
    """The kernels' extension with every call timed into ``seconds`` (by category; a linear by the
    label of its packed weights, found by the data pointer of its first buffer)."""

    def __init__(self, real, labels: dict[int, str]):
        self._real, self._labels = real, labels
        self.seconds: dict[str, float] = defaultdict(float)

    def __getattr__(self, name):
        fn = getattr(self._real, name)

        def timed(*args):
            if name == LAYER:  # its operators are timed inside the call (take_layer_timings)
                return fn(*args)
            t = time.perf_counter()
            out = fn(*args)
            elapsed = time.perf_counter() - t
            key = (self._labels.get(args[2].data_ptr(), "linear ?") if name == "qmatmul_quantized"
                   else CATEGORY.get(name, name))
            self.seconds[key] += elapsed
            return out

        return timed

    def take_layer_timings(self) -> None:
        """Adds the native layers' operator times since the last take (linears by their label)."""
        for inner, seconds in self._real.take_layer_timings().items():
            key = (self._labels.get(int(inner.split("@")[1]), "linear ?") if inner.startswith("linear@")
                   else CATEGORY.get(inner, inner))
            self.seconds[key] += seconds


def _linears(model) -> dict[str, dict]:
    """label -> {modules, bytes, in, out} for every quantized projection, by role and format."""
    from dovetail.models.quantized import QuantLinear

    out: dict[str, dict] = {}
    for name, module in model.named_modules():
        inner = getattr(module, "inner", module)
        if not isinstance(inner, QuantLinear) or inner is not module:
            continue
        role = name.rsplit(".", 1)[-1].replace("_proj", "")
        label = f"linear {role} {inner.qtype.name}"
        entry = out.setdefault(label, {"modules": [], "bytes": 0, "in_out": []})
        entry["modules"].append(inner)
        entry["bytes"] += inner.nbytes
        entry["in_out"].append((inner.in_features, inner.out_features))
    return out


def profile_forward(lm, rows_list=ROWS, reps: int = 7, prefix: int = PREFIX) -> dict:
    """Per-operator medians (ms) of ``lm``'s forward over chains of each row count, after a
    ``prefix``-token context."""
    import torch

    from dovetail.models import quantized

    linears = _linears(lm.model)
    labels = {m.q.data_ptr(): label for label, entry in linears.items() for m in entry["modules"]}
    timed = TimedOps(quantized.ops(), labels)
    real_ops, real_fast_ops = quantized.ops, lm.fast.ops
    quantized.ops, lm.fast.ops = (lambda: timed), timed
    real_ops().set_layer_timing(True)
    try:
        lm.reset()
        lm.extend([1000 + i % 5000 for i in range(prefix)])
        report = {}
        for rows in rows_list:
            tokens, parents = np.arange(2000, 2000 + rows), np.arange(-1, rows - 1)
            samples: dict[str, list[float]] = defaultdict(list)
            for rep in range(reps + 1):
                timed.seconds.clear()
                t = time.perf_counter()
                with torch.inference_mode():
                    lm.forward_tree(tokens, parents, range(rows), lm.committed)
                total = time.perf_counter() - t
                timed.take_layer_timings()
                lm.commit([])  # drop the pending chain: every forward sees the same prefix
                if rep == 0:
                    continue  # warm-up
                samples["total"].append(total)
                samples[GLUE].append(total - sum(timed.seconds.values()))
                for key, seconds in timed.seconds.items():
                    samples[key].append(seconds)
            report[rows] = {key: round(1e3 * statistics.median(v), 3) for key, v in samples.items()}
            say(f"after {prefix} tokens, {rows} rows: total {report[rows]['total']} ms")
    finally:
        quantized.ops, lm.fast.ops = real_ops, real_fast_ops
        real_ops().set_layer_timing(False)
    return _with_rates(report, linears)


def compare_pages(lm, target_dir, reps: int, rounds: int = 8) -> dict:
    """One-token forwards (after ``PREFIX`` tokens) of ``lm`` against a copy of its target whose
    weights are on 4 KiB pages, in alternating rounds of ``reps`` tokens: medians in ms."""
    import os

    from dovetail.kernels.arena import huge_page_bytes
    from dovetail.models.cached_lm import CachedLM
    from dovetail.models.quantized import load_quantized

    held = huge_page_bytes()
    os.environ["DOVETAIL_HUGE_PAGES"] = "0"
    try:
        small = CachedLM(load_quantized(target_dir, "native"))
    finally:
        os.environ.pop("DOVETAIL_HUGE_PAGES")
    out = one_token_ms({"huge pages": lm, "4 KiB pages": small}, reps, rounds, PREFIX)
    out["speedup"] = round(out["4 KiB pages"] / out["huge pages"], 3)
    out["process_mb_on_huge_pages"] = None if held is None else round(held / 2**20)
    say(f"one token: {out['huge pages']} ms on huge pages, {out['4 KiB pages']} ms on 4 KiB pages "
        f"({out['speedup']}x)")
    return out


def _with_rates(report: dict, linears: dict) -> dict:
    """Each category's extra ms over one row, its share of the forward, and for a linear its
    streaming rate (GB/s of packed weights) and multiply-add rate."""
    one = report[min(report)]
    out = {}
    for rows, by in report.items():
        entry = {}
        for key, ms in sorted(by.items(), key=lambda kv: -kv[1]):
            item = {"ms": ms, "extra_ms": round(ms - one.get(key, 0.0), 3),
                    "share": round(ms / by["total"], 3) if key != "total" else 1.0}
            if key in linears and ms > 0:
                macs = rows * sum(i * o for i, o in linears[key]["in_out"])
                item["gb_per_s"] = round(linears[key]["bytes"] / ms / 1e6, 2)
                item["g_macs_per_s"] = round(macs / ms / 1e6, 2)
            entry[key] = item
        out[str(rows)] = entry
    return out


def run(args) -> int:
    import torch

    from dovetail.kernels import kernel_path_name
    from dovetail.models.cached_lm import CachedLM
    from dovetail.models.quantized import load_quantized
    from dovetail.store import resolve_model

    target_dir = resolve_model(args.target)
    model = load_quantized(target_dir, "native")
    lm = CachedLM(model)
    if lm.fast is None:
        say("this target does not run the lean forward: nothing to profile by operator")
        return 1
    report = {"machine": machine_info(), "settings": {
        "target": args.target, "precision": "native", "isa": kernel_path_name(), "threads": torch.get_num_threads(),
        "prefix_tokens": PREFIX, "reps": args.reps, "rows": list(ROWS),
        "note": "medians per operator; 'torch + Python' is the forward's wall time minus the timed kernels; "
                "'profile' is after a 150-token prefix, 'profile_long' after 4,000 (attention's share)"},
        "profile": profile_forward(lm, ROWS, args.reps)}
    report["pages"] = compare_pages(lm, target_dir, args.reps)
    report["profile_long"] = profile_forward(lm, ROWS, max(3, args.reps // 2), prefix=LONG_PREFIX)
    report["verify_cost_ratio"] = {  # a forward of n rows against one row, the figure verification pays
        name: {rows: round(by[rows]["total"]["ms"] / by["1"]["total"]["ms"], 2) for rows in by}
        for name, by in (("prefix_150", report["profile"]), ("prefix_4000", report["profile_long"]))}
    say(f"verify cost ratios: {report['verify_cost_ratio']}")
    path = write_report(report, args)
    say(f"wrote {path}")
    return 0
