"""``python launch.py bench --suite workloads``: what users run, each against the target alone and llama.cpp.

Workloads (the packaged pair; greedy unless said):
  humaneval     chat: complete a HumanEval function from its prompt
  code-edit     chat: a real 60-150-line function in the prompt, returned with type hints added
  long-context  chat: ~4k tokens of real source code, then a question about it
  multi-turn    one conversation grown over 4 turns (each turn's answer joins the next prompt)
  sampling      the humaneval prompts at temperature 0.8
  creative      short creative chat prompts at temperature 0.8

Sampled workloads pass no seed (as most API callers), so a draft model samples its trees and
verification rejects against its q; the row "model chain:3, top-1 draft" gives each prompt a seed,
which keeps the draft on its most likely tokens (top-1 drafting), for comparison.

Dovetail configurations share one loaded target and draft: the target alone, the defaults (the
cost model over the draft model, ``ngram`` and ``suffix``), the model-free proposers alone
(cost model), and the draft model with chain:3 every step (no cost model). llama.cpp runs on
the same GGUF files: plain decoding (``llama-bench`` tg at the prompt's depth), its draft model
(``draft-simple``, n-max 3) and its model-free types (``ngram-simple``, ``ngram-map-k``, and the
two chained), through ``llama-speculative-simple`` on the same prompt text.

Decode speed excludes prefill (the same for every configuration of one engine). Greedy rows say
whether the output is token-identical to Dovetail's target alone. JSON and PNG go to
``<--results-dir>/<name>.{json,png}``.
"""

from __future__ import annotations

import inspect
import tempfile
import textwrap
import time
from pathlib import Path

from bench.common import check_decoding_args, humaneval_prompts, machine_info, say, write_report

LLAMA_TYPES = {"draft-simple n3": ["--spec-type", "draft-simple", "--spec-draft-n-max", "3"],
               "ngram-simple": ["--spec-type", "ngram-simple"],
               "ngram-map-k": ["--spec-type", "ngram-map-k"],
               "ngram-simple,ngram-map-k": ["--spec-type", "ngram-simple,ngram-map-k"]}


def _edit_sources() -> list[str]:
    """Real functions of 60-150 lines from Python's standard library (no type hints in them)."""
    import argparse
    import difflib
    import textwrap as tw

    picks = [argparse.HelpFormatter._format_usage, tw.TextWrapper._wrap_chunks,
             difflib.SequenceMatcher.find_longest_match]
    return [textwrap.dedent(inspect.getsource(f)) for f in picks]


def _long_source(tokenizer, tokens: int) -> str:
    """Up to ``tokens`` tokens of this repository's own source: whole files in a fixed order, each
    that still fits."""
    root = Path(__file__).resolve().parent.parent / "dovetail"
    text, used = "", 0
    for path in sorted(root.rglob("*.py")):
        part = f"# file: {path.relative_to(root.parent)}\n{path.read_text()}\n"
        size = len(tokenizer.encode(part))
        if used + size <= tokens:
            text, used = text + part, used + size
    return text


def workloads(dt, count: int, context_tokens: int) -> dict[str, dict]:
    """name -> {"prompts": [token ids], "temperature": float, "turns": [user messages] (multi-turn)}."""
    tok = dt.tokenizer
    from dovetail.models.loading import encode_chat

    edits = [encode_chat(tok, "Add type hints to this Python function. Return the whole function, "
                              f"otherwise unchanged.\n\n```python\n{src}```") for src in _edit_sources()]
    source = _long_source(tok, context_tokens)
    long = [encode_chat(tok, f"{source}\n\nFor each file above, list its functions and classes with one line "
                             "each on what they do.")]
    return {
        "humaneval": {"prompts": humaneval_prompts(tok, count), "temperature": 0.0},
        "code-edit": {"prompts": edits[:count], "temperature": 0.0},
        "long-context": {"prompts": long, "temperature": 0.0},
        "multi-turn": {"turns": ["Write a Python function that parses an ISO 8601 date string.",
                                 "Now make it also accept a trailing 'Z' and time zone offsets.",
                                 "Add a docstring and three doctest examples.",
                                 "Rewrite it without using the datetime module's fromisoformat."],
                       "temperature": 0.0},
        "sampling": {"prompts": humaneval_prompts(tok, count), "temperature": 0.8},
        "creative": {"prompts": [encode_chat(tok, text) for text in CREATIVE[:count]], "temperature": 0.8},
    }


CREATIVE = ["Write a short poem about the sea at night.",
            "Tell me a story about a fox who learns to fly, in one paragraph.",
            "Describe a city of the future in five sentences.",
            "Write a letter from a lighthouse keeper to a friend far away."]


def _engines(dt) -> dict:
    """The Dovetail configurations, sharing ``dt``'s loaded target and draft model."""
    from dovetail.engine import SpeculativeEngine
    from dovetail.models.tree import TreeShape
    from dovetail.speculation import SpeculationSetup

    base = dt.engine
    key = dt.speculation_setup().cost_key
    chain3 = SpeculativeEngine(base.target, base.draft, base.eos, setup=SpeculationSetup(shape=TreeShape.chain(3)))
    return {
        "target alone": (base, False),
        "default (cost model: model, ngram, suffix)": (base, True),
        "ngram+suffix (cost model)": (SpeculativeEngine(base.target, None, base.eos, setup=SpeculationSetup(
            ("ngram", "suffix"), False, None, {**key, "draft": None}, say)), True),
        "model chain:3 (former default)": (chain3, True),
        SEEDED_ROW: (chain3, True),
    }


SEEDED_ROW = "model chain:3, top-1 draft (seeded)"  # sampled workloads only


def _run(engine, speculate: bool, prompts: list[list[int]], max_new: int, temperature: float,
         seeded: bool = False) -> dict:
    from dovetail.sampling import SamplingParams
    from dovetail.request import GenerationStats

    tokens, decode_s, outputs, merged = 0, 0.0, [], GenerationStats()
    for i, ids in enumerate(prompts):
        params = SamplingParams(temperature, seed=i if seeded else None) if temperature else SamplingParams()
        result = engine.generate(ids, max_new, params, speculate=speculate)
        s = result.stats
        tokens += s.new_tokens
        decode_s += s.total_s - s.prefill_s
        outputs.append(result.token_ids)
        merged.accepted_per_step += s.accepted_per_step
        for k, v in s.choices.items():
            merged.choices[k] = merged.choices.get(k, 0) + v
        merged.predicted_tokens += s.predicted_tokens
    row = {"tokens": tokens, "decode_s": round(decode_s, 2), "tok_s": round(tokens / decode_s, 2),
           "tau": round(merged.mean_accepted, 3) if speculate else 1.0,
           "acceptance_by_position": [round(x, 3) for x in merged.acceptance_by_position(4)] if speculate else [],
           "predicted_tau": round(merged.predicted_per_step, 3) if speculate else None,
           "choices": _proposer_mix(merged.choices)}
    return row, outputs


ACCEPTANCE_TEMPERATURES = (0.8, 1.0, 1.5)


def expected_first_acceptance(dt, prompts: list[list[int]], outputs: list[list[int]]) -> dict:
    """Along the target's own sampled texts: the chance that the draft's first token is accepted,
    exactly (no second sampling): p(the draft's top token) when the draft proposes its top token
    (a request with its own seed), sum(min(p, q)) when it samples from q (without a seed), both
    warped at each temperature (the texts themselves were sampled at the workload's)."""
    import torch

    from dovetail.models.verification import target_probs
    from dovetail.sampling import SamplingParams

    target_lm, draft_lm = dt.engine.target.lm.fresh(), dt.engine.draft.lm.fresh()
    sums = {t: {"top-1 draft": 0.0, "sampled draft": 0.0} for t in ACCEPTANCE_TEMPERATURES}
    positions = 0
    with torch.inference_mode():
        for prompt, output in zip(prompts, outputs):
            ids = list(prompt) + list(output[:-1])
            keep = len(output)  # the logits before each output token
            target_lm.reset(), draft_lm.reset()
            p_logits = target_lm.extend(ids, logits_to_keep=keep).float()
            q_logits = draft_lm.extend(ids, logits_to_keep=keep).float()
            vocab = min(p_logits.shape[-1], q_logits.shape[-1])
            for t in ACCEPTANCE_TEMPERATURES:
                params = SamplingParams(t)
                p, q = target_probs(p_logits[:, :vocab], params), target_probs(q_logits[:, :vocab], params)
                sums[t]["top-1 draft"] += float(p.gather(-1, q.argmax(-1, keepdim=True)).sum())
                sums[t]["sampled draft"] += float(torch.minimum(p, q).sum())
            positions += keep
    return {"positions": positions, **{f"T={t}": {k: round(v / positions, 3) for k, v in by.items()}
                                       for t, by in sums.items()}}


def _proposer_mix(choices: dict) -> dict:
    """Steps by proposer (depths summed), largest first."""
    mix: dict[str, int] = {}
    for key, steps in choices.items():
        name = key.split("@")[0]
        mix[name] = mix.get(name, 0) + steps
    return dict(sorted(mix.items(), key=lambda kv: -kv[1]))


def _multi_turn_prompts(dt, engine, turns: list[str], max_new: int) -> list[list[int]]:
    """The conversation's prompt at each turn, its answers written by the target itself (greedy)."""
    from dovetail.models.loading import encode_messages

    messages, prompts = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        ids = encode_messages(dt.tokenizer, messages)
        prompts.append(ids)
        answer = engine.generate(ids, max_new, speculate=False).token_ids
        messages.append({"role": "assistant", "content": dt.tokenizer.decode(answer, skip_special_tokens=True)})
    return prompts


def _llama_rows(bin_dir, dt, prompts, max_new, temperature, threads) -> dict:
    from bench.native import llama_bench

    rows = {}
    depth = int(sum(len(p) for p in prompts) / len(prompts))
    try:
        tg = llama_bench(bin_dir, dt.target_dir / "model.gguf", threads, ["-p", "0", "-n", str(max_new), "-d",
                                                                          str(depth), "-r", "2"])
        rows["llama.cpp alone"] = {"tok_s": round(float(tg[0]["avg_ts"]), 2), "depth": depth}
    except Exception as exc:  # report, keep the others
        rows["llama.cpp alone"] = {"error": str(exc)[:200]}
    for label, extra in LLAMA_TYPES.items():
        try:
            rows[f"llama.cpp {label}"] = _llama_spec(bin_dir, dt, prompts, max_new, temperature, threads, extra)
        except Exception as exc:
            rows[f"llama.cpp {label}"] = {"error": str(exc)[:200]}
    return rows


def _llama_spec(bin_dir, dt, prompts, max_new, temperature, threads, extra) -> dict:
    import re
    import subprocess

    tokens, seconds, drafted, accepted = 0, 0.0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for ids in prompts:
            prompt_file = Path(tmp) / "prompt.txt"
            prompt_file.write_text(dt.tokenizer.decode(ids, skip_special_tokens=False))
            cmd = [str(bin_dir / "llama-speculative-simple"), "-m", str(dt.target_dir / "model.gguf"),
                   "-t", str(threads), "--temp", str(temperature), "-n", str(max_new), "-f", str(prompt_file),
                   "-c", str(len(ids) + max_new + 64), "-b", str(len(ids) + max_new + 64), *extra]
            if "draft-simple" in extra:
                cmd += ["-md", str(dt.draft_dir / "model.gguf"), "-td", str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            text = proc.stdout + proc.stderr
            decoded = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", text)
            if not decoded:
                raise RuntimeError(" | ".join(text.strip().splitlines()[-3:]))
            tokens += int(decoded.group(1))
            seconds += float(decoded.group(2))
            d, a = re.search(r"n_drafted\s*=\s*(\d+)", text), re.search(r"n_accept\s*=\s*(\d+)", text)
            drafted += int(d.group(1)) if d else 0
            accepted += int(a.group(1)) if a else 0
    return {"tok_s": round(tokens / seconds, 2), "tokens": tokens, "drafted": drafted, "accepted": accepted}


def run(args) -> int:
    import torch

    from bench.native import llama_cpp_bin
    from dovetail.api import Dovetail
    from dovetail.config import engine_config_from_args

    check_decoding_args(args)
    config = engine_config_from_args(args)
    config.engine = "inprocess"
    dt = Dovetail(config).load()
    threads = torch.get_num_threads()
    names = [n for n in args.workloads.split(",") if n] if args.workloads else None
    report = {"machine": machine_info(), "settings": {
        "target": config.target, "draft": config.draft, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "threads": threads,
        "decode_s": "generation time minus prefill", "context_tokens": args.context_tokens}, "workloads": {}}
    bin_dir = None if args.no_llama else llama_cpp_bin()
    engines = _engines(dt)
    for name, work in workloads(dt, args.prompts, args.context_tokens).items():
        if names and name not in names:
            continue
        prompts = work.get("prompts") or _multi_turn_prompts(dt, dt.engine, work["turns"], args.max_new_tokens)
        entry = report["workloads"][name] = {"prompt_tokens": [len(p) for p in prompts],
                                             "temperature": work["temperature"], "rows": {}}
        reference = None
        for label, (engine, speculate) in engines.items():
            if label == SEEDED_ROW and not work["temperature"]:
                continue
            t = time.perf_counter()
            row, outputs = _run(engine, speculate, prompts, args.max_new_tokens, work["temperature"],
                                seeded=label == SEEDED_ROW)
            if label == "target alone":
                reference = outputs
            elif work["temperature"] == 0:
                row["identical_to_target"] = outputs == reference
            entry["rows"][label] = row
            say(f"{name} / {label}: {row['tok_s']} tok/s, tau {row['tau']}, {row['choices']} "
                 f"({time.perf_counter() - t:.0f}s)")
            write_report(report, args)
        if bin_dir is not None:
            for label, row in _llama_rows(bin_dir, dt, prompts, args.max_new_tokens, work["temperature"],
                                          threads).items():
                entry["rows"][label] = row
                say(f"{name} / {label}: {row}")
        if work["temperature"] and dt.engine.draft is not None:
            entry["expected_first_acceptance"] = expected_first_acceptance(dt, prompts, reference)
            say(f"{name} / expected first-token acceptance: {entry['expected_first_acceptance']}")
        _ratios(entry)
        write_report(report, args)
    path = write_report(report, args)
    _plot(report, path.with_suffix(".png"))
    say(f"wrote {path} and {path.with_suffix('.png')}")
    dt.close()
    return 0


def _ratios(entry: dict) -> None:
    rows = entry["rows"]
    alone = rows["target alone"]["tok_s"]
    llama = [r["tok_s"] for k, r in rows.items() if k.startswith("llama.cpp") and "tok_s" in r]
    for row in rows.values():
        if "tok_s" in row:
            row["vs_target_alone"] = round(row["tok_s"] / alone, 3)
            if llama:
                row["vs_llama_best"] = round(row["tok_s"] / max(llama), 3)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["workloads"])
    labels = sorted({k for w in report["workloads"].values() for k, r in w["rows"].items() if "tok_s" in r},
                    key=lambda k: (k.startswith("llama"), k))
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(names)), 4.5))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        values = [report["workloads"][n]["rows"].get(label, {}).get("tok_s", 0) for n in names]
        ax.bar([j + i * width for j in range(len(names))], values, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"Workloads, {report['machine']['cpu']}, {report['settings']['threads']} threads")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
