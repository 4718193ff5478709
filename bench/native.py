"""``python launch.py bench --suite native``: Dovetail on the packaged GGUF files against llama.cpp
on the same files, side by side in one run (HumanEval chat prompts, greedy, same thread count).

Rows: llama.cpp alone (``llama-bench``) and speculative (``llama-speculative-simple``, 0.5B draft,
3 and 8 draft tokens); Dovetail target-only and speculative (native GGUF blocks), through the
actor system (serve's engine) and in one process (generate's default on a machine where the draft
would take turns with the target); optionally fp32 Dovetail and HF ``generate`` (slow:
``--methods``). Also: the forward-cost curve (ms by tokens per forward) of Dovetail's native target
next to llama.cpp's ``pp N``, peak RSS, the time to first token of the README's generate command
from a warm cache, and how often the native target's greedy tokens agree with the fp32 target's.
llama.cpp is built from the llama-cpp-python sdist by ``bench/build_llamacpp.sh`` (cached); if it
cannot be built, its rows are skipped with a note.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import humaneval_prompts, machine_info, result_path, say, write_report
from dovetail.errors import UserError

CURVE_TOKENS = (1, 2, 3, 4, 8, 16, 32)
METHODS = ("llama", "dovetail_inprocess", "dovetail_actors", "curves", "ttft", "fp32", "7b")
DEFAULT_METHODS = ("llama", "dovetail_inprocess", "dovetail_actors", "curves", "ttft")
LLAMA_SPEC_DRAFTS = (3, 8)
SCRIPT = Path(__file__).resolve().parent / "build_llamacpp.sh"
CHECKOUT = Path(__file__).resolve().parent.parent


def llama_cpp_bin() -> Path | None:
    """The llama.cpp binaries (built once, cached under DOVETAIL_HOME), or None with a note."""
    if not SCRIPT.exists():
        say("bench/build_llamacpp.sh is not here (installed package?): llama.cpp rows skipped")
        return None
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        say(f"llama.cpp could not be built, its rows are skipped: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return Path(proc.stdout.strip().splitlines()[-1])


def llama_bench(bin_dir: Path, model: Path, threads: int, args: list[str]) -> list[dict]:
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-o", "json", *args],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def llama_speculative(bin_dir: Path, target: Path, draft: Path, prompt_text: str, n_draft: int, threads: int,
                      max_new: int, tmp: Path) -> dict:
    tmp.write_text(prompt_text)
    proc = subprocess.run([str(bin_dir / "llama-speculative-simple"), "-m", str(target), "-md", str(draft),
                           "--spec-type", "draft-simple", "--spec-draft-n-max", str(n_draft), "-t", str(threads),
                           "-td", str(threads), "--temp", "0", "-n", str(max_new), "-f", str(tmp)],
                          capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    decoded = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", text)
    drafted, accepted = re.search(r"n_drafted\s*=\s*(\d+)", text), re.search(r"n_accept\s*=\s*(\d+)", text)
    if not decoded:
        raise RuntimeError(f"llama-speculative-simple failed: {text.strip().splitlines()[-3:]}")
    return {"tokens": int(decoded.group(1)), "seconds": float(decoded.group(2)),
            "drafted": int(drafted.group(1)) if drafted else 0, "accepted": int(accepted.group(1)) if accepted else 0}


def forward_curve(model, tokens=CURVE_TOKENS, context: int = 150, reps: int = 5) -> dict[int, float]:
    """Median ms of one forward of n chained tokens after a ``context``-token prefix."""
    from dovetail.models.cached_lm import CachedLM

    lm = CachedLM(model)
    lm.extend(list(range(1000, 1000 + context)))
    curve = {}
    for n in tokens:
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            lm.forward_tree(np.arange(n) + 2000, np.arange(-1, n - 1), range(n), lm.committed)
            times.append(time.perf_counter() - t0)
            lm.commit([])
        curve[n] = round(1e3 * statistics.median(times[1:]), 1)
    return curve


def _dovetail_row(label, dt, prompts, max_new, speculate=True) -> dict:
    tokens, seconds, steps, outputs = 0, 0.0, 0, []
    for ids in prompts:
        result = dt.generate_ids(ids, max_new, speculate=speculate)
        stats = result.stats
        tokens += stats.new_tokens
        seconds += stats.total_s - stats.prefill_s
        steps += stats.steps
        outputs.append(result.token_ids)
    row = {"method": label, "tokens": tokens, "decode_s": round(seconds, 2), "tok_s": round(tokens / seconds, 2),
           "tau": round(tokens / max(steps, 1), 2) if speculate else None}
    say(f"{label}: {row}")
    return row, outputs


def ttft_of_generate() -> float | None:
    """Seconds from starting the README's generate command (warm cache) to its first streamed byte."""
    cmd = [sys.executable, "launch.py", "generate", "--chat", "--max-new-tokens", "8",
           "--prompt", "Write a Python function that checks whether a number is prime."]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=CHECKOUT)
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - t0
    proc.communicate()
    return round(elapsed, 1) if first else None


QWEN2_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=False, rms_norm_eps=1e-6)


def random_q4_model(store, like: Path) -> Path:
    """A Qwen2-shaped 7B with random Q4_K blocks (~4.4 GB), made once under DOVETAIL_HOME: it
    measures the cost of the paper's scale, not quality (no real 7B model can be had offline)."""
    import gguf
    from transformers import AutoTokenizer, Qwen2Config

    from dovetail.models.spec import GGUF_NAME

    folder = store.root / "bench" / "qwen2-7b-random-q4"
    if (folder / GGUF_NAME).exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(**QWEN2_7B)
    config.save_pretrained(partial)
    AutoTokenizer.from_pretrained(like).save_pretrained(partial)
    rng = np.random.default_rng(0)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(partial / GGUF_NAME), "qwen2")
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * 128  # 128: head dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "lm_head.weight": (config.vocab_size, h),
              "model.norm.weight": (h,)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "self_attn.q_proj.bias": (h,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,), p + "mlp.gate_proj.weight": (i, h),
                       p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
                       p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    for name, shape in shapes.items():
        key = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if len(shape) == 1:
            writer.add_tensor(key, (1.0 if "norm" in name else 0.0) + np.zeros(shape, np.float32))
            continue
        rows, cols = shape
        blocks = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
        blocks[..., 0:2] = np.frombuffer(np.float16(0.02 / 63).tobytes(), np.uint8)  # d
        blocks[..., 2:4] = np.frombuffer(np.float16(0.02 / 63).tobytes(), np.uint8)  # dmin
        writer.add_tensor(key, blocks.reshape(rows, -1), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    partial.rename(folder)
    return folder


def run(args) -> int:
    from dovetail.api import Dovetail
    from dovetail.config import EngineConfig
    from dovetail.models.quantized import load_quantized
    from dovetail.store import DEFAULT_DRAFT, DEFAULT_TARGET, ModelStore

    if args.prompts < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise UserError("--prompts and --max-new-tokens must be >= 1")
    max_new = args.max_new_tokens or 256
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    store = ModelStore()
    target_dir, draft_dir = store.fetch(DEFAULT_TARGET), store.fetch(DEFAULT_DRAFT)
    methods = set(args.methods.split(",")) if args.methods != "target,hf_assisted,dovetail" else set(DEFAULT_METHODS)
    if methods - set(METHODS):
        raise UserError(f"unknown methods {sorted(methods - set(METHODS))}; choose from {METHODS}")
    results = {"machine": machine_info(), "settings": {"prompts": args.prompts, "max_new_tokens": max_new,
                                                       "threads": threads, "greedy": True, "tree": "chain:3"},
               "rows": [], "notes": []}
    dt = Dovetail(EngineConfig(engine="inprocess", threads=threads), verbose=False)
    prompts = humaneval_prompts(dt.tokenizer, args.prompts)
    texts = [dt.tokenizer.decode(p) for p in prompts]
    mean_prompt = int(statistics.mean(len(p) for p in prompts))
    results["settings"]["mean_prompt_tokens"] = mean_prompt

    if "llama" in methods:
        bin_dir = llama_cpp_bin()
        if bin_dir is None:
            results["notes"].append("llama.cpp rows skipped: it could not be built here")
        else:
            tg = llama_bench(bin_dir, target_dir / "model.gguf", threads, ["-p", "0", "-n", "128", "-d",
                                                                          str(mean_prompt), "-r", "2"])
            results["rows"].append({"method": "llama.cpp alone (llama-bench tg128 @ prompt depth)",
                                    "tok_s": round(tg[0]["avg_ts"], 2)})
            pp = llama_bench(bin_dir, target_dir / "model.gguf", threads,
                             ["-n", "0", "-p", ",".join(map(str, CURVE_TOKENS)), "-r", "3"])
            results["llama_cpp_forward_ms"] = {int(r["n_prompt"]): round(r["n_prompt"] / r["avg_ts"] * 1e3, 1)
                                               for r in pp}
            say(f"llama.cpp alone {results['rows'][-1]['tok_s']} tok/s; forward ms {results['llama_cpp_forward_ms']}")
            tmp = store.root / "bench-prompt.txt"
            for n_draft in LLAMA_SPEC_DRAFTS:
                runs = [llama_speculative(bin_dir, target_dir / "model.gguf", draft_dir / "model.gguf", text,
                                          n_draft, threads, max_new, tmp) for text in texts]
                tokens, secs = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
                drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
                results["rows"].append({"method": f"llama.cpp speculative, 0.5B draft, {n_draft} draft tokens",
                                        "tokens": tokens, "tok_s": round(tokens / secs, 2),
                                        "accept_rate": round(accepted / max(drafted, 1), 3)})
                say(f"{results['rows'][-1]}")
            tmp.unlink(missing_ok=True)

    outputs = {}
    if "dovetail_inprocess" in methods:
        dt.load()
        row, outputs["native_alone"] = _dovetail_row("Dovetail target-only, native, in-process", dt, prompts,
                                                     max_new, speculate=False)
        results["rows"].append(row)
        row, outputs["native_spec_inprocess"] = _dovetail_row("Dovetail speculative, native, in-process (generate's default here)", dt,
                                                              prompts, max_new)
        results["rows"].append(row)
        if "curves" in methods:
            results["dovetail_forward_ms"] = forward_curve(dt.engine.target.lm.model)
            results["draft_forward_ms"] = forward_curve(dt.engine.draft.lm.model, (1, 2, 4))
            say(f"Dovetail target forward ms {results['dovetail_forward_ms']}")
        dt.close()
    if "dovetail_actors" in methods:
        with Dovetail(EngineConfig(engine="actors"), verbose=False) as actors:
            actors.load()
            row, outputs["native_spec_actors"] = _dovetail_row("Dovetail speculative, native, actor system (serve's engine)",
                                                               actors, prompts, max_new)
            results["rows"].append(row)
            workers = actors.engine.info["workers"]
            results["peak_rss_gib"] = {name: round(w["peak_rss"] / 2**30, 2) for name, w in workers.items()}
    if "fp32" in methods:  # slow: fp32 weights (converted once) and HF generate
        fp32 = Dovetail(EngineConfig(engine="inprocess", threads=threads, target_precision="fp32",
                                     draft_precision="int8"), verbose=False).load()
        row, outputs["fp32_spec"] = _dovetail_row("Dovetail speculative, fp32 target, int8 draft, in-process",
                                                  fp32, prompts, max_new)
        results["rows"].append(row)
        model = fp32.engine.target.lm.model
        from dovetail.models.fast_linear import set_linear_kernel

        set_linear_kernel(model, "stock")
        tokens, secs = 0, 0.0
        for ids in prompts:
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=fp32.eos_token_ids, pad_token_id=fp32.eos_token_ids[0])
            secs += time.perf_counter() - t0
            tokens += out.shape[1] - len(ids)
        results["rows"].append({"method": "HF generate, fp32 target alone", "tokens": tokens,
                                "tok_s": round(tokens / secs, 2)})
        say(f"{results['rows'][-1]}")
        if "native_alone" in outputs:
            same = [sum(1 for _ in _common_prefix(a, b)) / max(len(b), 1)
                    for a, b in zip(outputs["native_alone"], outputs["fp32_spec"])]
            results["native_vs_fp32_greedy_prefix_agreement"] = round(float(np.mean(same)), 3)
        fp32.close()
    if "native_alone" in outputs:
        for key, out in outputs.items():
            if key.startswith("native_spec"):
                results.setdefault("identical_to_target_alone", {})[key] = sum(
                    a == b for a, b in zip(out, outputs["native_alone"]))
    if "7b" in methods:
        import dataclasses

        from dovetail.actors.system import ActorEngine
        from dovetail.describe import describe_model
        from dovetail.models.lm_proposer import DraftVocab

        folder = random_q4_model(store, target_dir)
        t0 = time.perf_counter()
        model = load_quantized(folder, "native")
        results["load_7b_s"] = round(time.perf_counter() - t0, 1)
        results["forward_7b_ms"] = forward_curve(model, reps=3)
        say(f"7B random Q4_K, 1 shard: forward ms {results['forward_7b_ms']}")
        del model
        for sockets in ("0", "0|1"):  # the actor system: load, then verify chain:3 blocks (target-only steps too)
            config = EngineConfig(target=str(folder), draft=str(draft_dir), sockets=sockets, draft_cpus="shared",
                                  engine="actors")
            target = dataclasses.replace(describe_model(folder, "native", weights=False), eos_token_ids=(),
                                         context_length=4096)
            engine = ActorEngine(target, describe_model(draft_dir, "auto", "draft", weights=False), config,
                                 vocab=DraftVocab(151936))
            try:
                result = engine.generate(prompts[0], 16)
                key = f"7b_actors_{len(engine.plan.shards)}_shards"
                workers = engine.info["workers"]
                results[key] = {"verify_ms_per_step": round(1e3 * result.stats.verify_s / max(result.stats.steps, 1), 1),
                                "steps": result.stats.steps,
                                "peak_rss_gib": {n: round(w["peak_rss"] / 2**30, 2) for n, w in workers.items()}}
                say(f"{key}: {results[key]}")
            finally:
                engine.shutdown()
    if "ttft" in methods:
        results["ttft_generate_s"] = ttft_of_generate()
        say(f"time to first token of the README generate command: {results['ttft_generate_s']} s")
    best = max((r["tok_s"] for r in results["rows"] if r["method"].startswith("llama.cpp")), default=None)
    for row in results["rows"]:
        if best:
            row["x_llama_cpp_best"] = round(row["tok_s"] / best, 2)
    path = write_report(results, args)
    _plot(results, result_path(args, ".png"))
    say(f"results in {path}")
    print(json.dumps({r["method"]: r["tok_s"] for r in results["rows"]}))
    return 0


def _common_prefix(a, b):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    rows = results["rows"]
    ax1.barh([r["method"] for r in rows], [r["tok_s"] for r in rows], color=["#999" if r["method"].startswith(
        "llama") else "#2a7" for r in rows])
    ax1.set_xlabel("tokens/s (greedy, HumanEval chat prompts)")
    ax1.invert_yaxis()
    for key, label in (("dovetail_forward_ms", "Dovetail native"), ("llama_cpp_forward_ms", "llama.cpp pp N"),
                       ("forward_7b_ms", "Dovetail native, 7B random, 1 shard")):
        if key in results:
            xs = sorted(int(k) for k in results[key])
            ax2.plot(xs, [results[key][k if k in results[key] else str(k)] for k in xs], marker="o", label=label)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("tokens per forward")
    ax2.set_ylabel("ms per forward")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
