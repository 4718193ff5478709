"""``python launch.py bench --suite humaneval``: HumanEval greedy decoding, side by side in one run.

Methods (same prompts, same target weights, one process, run one after another):
  target      target-only HF ``generate()`` (stock kernels): the baseline
  hf_assisted HF assisted generation with the same draft model (fp32, stock kernels)
  dovetail_*  Dovetail with each requested tree (chains and trees)

It also measures the forward-cost curves behind the design: target forward time by tokens
per forward with stock and with Dovetail's linear kernel, and draft cost per tree level.
Results go to ``<--results-dir>/<name>.json`` and ``.png``.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.common import check_decoding_args, humaneval_prompts, machine_info, say, write_report
from dovetail.errors import UserError
from dovetail.sampling import SamplingParams

CURVE_TOKENS = (1, 2, 3, 4, 5, 8, 16, 32)


def _median_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 1)


@torch.inference_mode()
def forward_curve(model, tokens=CURVE_TOKENS, context: int = 300) -> dict[int, float]:
    """Median forward time (ms) by tokens per forward, over a KV cache of ``context`` tokens."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.randint(100, 1000, (1, context)), cache=cache, logits_to_keep=1)
    curve = {}
    for n in tokens:
        ids = torch.randint(100, 1000, (1, n))

        def step():
            model(input_ids=ids, cache=cache)
            cache.crop(-n)

        curve[n] = _median_ms(step)
    return curve


def run(args) -> int:
    from dovetail.api import Dovetail
    from dovetail.config import engine_config_from_args
    from dovetail.describe import describe_model
    from dovetail.models.cached_lm import CachedLM
    from dovetail.models.fast_linear import set_linear_kernel
    from dovetail.models.lm_proposer import DraftProposer
    from dovetail.models.loading import load_causal_lm
    from dovetail.request import GenerationStats
    from dovetail.store import AUTO_DRAFT, DEFAULT_DRAFT, DRAFTER_KEYWORD, drafter_dir, is_drafter_dir

    methods, trees = check_decoding_args(args)
    config = engine_config_from_args(args)
    config.engine = "inprocess"  # this suite compares decoding loops inside one process
    if config.draft == AUTO_DRAFT:  # compare both: the draft model here, the trained drafter (if any) below
        config.draft = DEFAULT_DRAFT
        if not args.drafters and is_drafter_dir(drafter_dir(config.target)):
            args.drafters = DRAFTER_KEYWORD
    elif (config.draft and is_drafter_dir(Path(config.draft).expanduser())) or config.draft == DRAFTER_KEYWORD:
        raise UserError("bench --draft takes a draft model (for HF assisted); pass drafters with --drafters")
    args.drafter_paths = _drafter_paths(args.drafters, config.target)  # refuse bad ones before loading
    dt = Dovetail(config).load()
    tokenizer, engine = dt.tokenizer, dt.engine
    target = engine.target.lm.model
    prompts = humaneval_prompts(tokenizer, args.prompts)
    eos = sorted(engine.eos)
    report = {"machine": machine_info(), "settings": {
        "target": config.target, "draft": config.draft, "draft_precision": config.draft_precision,
        "target_kernel": config.target_kernel, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "greedy": True, "prompt_tokens": [len(p) for p in prompts]}, "methods": {}}

    def hf_generate(**extra):
        outs, seconds = [], 0.0
        for ids in prompts:
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                  do_sample=False, eos_token_id=eos, pad_token_id=eos[0], **extra)
            seconds += time.perf_counter() - t0
            outs.append(out[0, len(ids):].tolist())
        return outs, seconds

    def record(name, outs, seconds, extra=None, exact=True):
        tokens = sum(len(o) for o in outs)
        entry = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 3)}
        if reference is not None and exact:
            entry["identical_to_target"] = [o == r for o, r in zip(outs, reference)]
        entry.update(extra or {})
        report["methods"][name] = entry
        say(f"{name}: {entry['tokens_per_s']:.2f} tok/s ({tokens} tokens, {seconds:.0f}s)"
            + (f", identical {sum(entry['identical_to_target'])}/{len(outs)}" if "identical_to_target" in entry
               else ""))
        write_report(report, args)

    def run_dovetail(name, shape, params=SamplingParams(), draft=None):
        """One row: ``draft`` (default: the loaded draft model) with ``shape`` pinned, through an
        engine of its own over the loaded target."""
        from dovetail.engine import SpeculativeEngine
        from dovetail.speculation import SpeculationSetup

        runner = SpeculativeEngine(engine.target, draft or engine.draft, eos, setup=SpeculationSetup(shape=shape))
        results = [runner.generate(ids, args.max_new_tokens,
                                   replace(params, seed=i) if not params.greedy else params)
                   for i, ids in enumerate(prompts)]
        merged = GenerationStats(accepted_per_step=[a for r in results for a in r.stats.accepted_per_step])
        record(name, [r.token_ids for r in results], sum(r.stats.total_s for r in results), {
            "tree": str(shape), "steps": sum(r.stats.steps for r in results),
            "mean_accepted": round(merged.mean_accepted, 3),
            "acceptance_by_position": [round(x, 3) for x in merged.acceptance_by_position(shape.depth)],
            "draft_s": round(sum(r.stats.draft_s for r in results), 2),
            "verify_s": round(sum(r.stats.verify_s for r in results), 2),
            "prefill_s": round(sum(r.stats.prefill_s for r in results), 2), "temperature": params.temperature},
            exact=params.greedy)

    reference = None
    if "target" in methods:
        set_linear_kernel(target, "stock")
        outs, seconds = hf_generate()
        record("target", outs, seconds)
        reference = outs
    if "hf_assisted" in methods and config.draft:
        assistant = load_causal_lm(describe_model(dt.draft_dir, "fp32", "draft"))  # stock kernels: HF's own way
        set_linear_kernel(target, "stock")
        outs, seconds = hf_generate(assistant_model=assistant)
        record("hf_assisted", outs, seconds)
        if "dovetail" in methods and engine.draft:
            # The same fp32 draft HF used, under Dovetail's loop: separates loop from draft precision.
            set_linear_kernel(target, config.target_kernel if config.target_kernel != "mkldnn" else "stock")
            fp32_draft = DraftProposer(CachedLM(assistant), trees[0], engine.draft.vocab)
            run_dovetail(f"dovetail[{trees[0]}, fp32 draft]", trees[0], draft=fp32_draft)
        del assistant
    set_linear_kernel(target, config.target_kernel if config.target_kernel != "mkldnn" else "stock")
    if "dovetail" in methods and engine.draft:
        for shape in tqdm(trees, desc="dovetail trees", file=sys.stderr):
            run_dovetail(f"dovetail[{shape}]", shape)
        if args.sampled:
            run_dovetail(f"dovetail[{trees[0]}, T={args.sampled}]", trees[0], SamplingParams(args.sampled))
    _run_drafters(args, dt, engine, run_dovetail, report)
    _add_ratios(report)
    if not args.no_curves:
        report["curves"] = _curves(dt, target)
    report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    path = write_report(report, args)
    _plot(report, path.with_suffix(".png"))
    print(json.dumps({k: {kk: v[kk] for kk in ("tokens_per_s", "vs_target", "vs_hf_assisted") if kk in v}
                      for k, v in report["methods"].items()}, indent=1))
    say(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def _drafter_paths(text: str, target: str) -> list[Path]:
    from dovetail.store import DRAFTER_KEYWORD, is_drafter_dir, resolve_draft

    paths = []
    for item in filter(None, text.split(";")):
        if item != DRAFTER_KEYWORD and not is_drafter_dir(Path(item).expanduser()):
            raise UserError(f"--drafters: {item} is not a Dovetail drafter folder (no drafter.json)")
        paths.append(resolve_draft(item, target))
    return paths


def _run_drafters(args, dt, engine, run_dovetail, report) -> None:
    """Each ``--drafters`` folder as the draft (sharing the loaded target's embedding and head)."""
    from dovetail.config import parse_tree
    from dovetail.models.cached_lm import CachedLM
    from dovetail.models.drafter_net import load_drafter, read_spec, shared_frozen_tensors
    from dovetail.models.feature_proposer import FeatureDraftProposer
    if not args.drafter_paths:
        return
    shapes = [parse_tree(t) for t in args.drafter_trees.split(";") if t]
    target_model = engine.target.lm.model
    engine.target.lm.keep_hidden = True
    report["drafters"] = {}
    for path in args.drafter_paths:
        spec, meta = read_spec(path)
        for n, vocab in enumerate(int(v) for v in args.drafter_vocabs.split(";") if v):
            label = (f"{spec.fusion},L{spec.layers},{args.draft_precision}"
                     + (f",V{vocab or spec.draft_vocab}" if vocab or spec.draft_vocab else "")
                     + (f",init={spec.init}" if spec.init != "random" else ""))
            report["drafters"][label] = {"path": str(path), **{k: meta.get(k) for k in (
                "corpus", "train_tokens", "train_seconds", "dump_seconds", "held_out_acc1", "held_out_acc2",
                "held_out_acc3", "held_out_chain_tau")}, "curve": _training_curve(path)}
            drafter = load_drafter(path, dt.target_dir, frozen=shared_frozen_tensors(target_model),
                                   draft_vocab=vocab, precision=args.draft_precision)
            proposer = FeatureDraftProposer(CachedLM(drafter), shapes[0])
            for shape in tqdm(shapes if n == 0 else shapes[:1], desc=f"drafter {label}", file=sys.stderr):
                run_dovetail(f"dovetail-drafter[{label}][{shape}]", shape, draft=proposer)
            if args.sampled and n == 0:
                run_dovetail(f"dovetail-drafter[{label}][{shapes[0]}, T={args.sampled}]", shapes[0],
                             SamplingParams(args.sampled), draft=proposer)
    engine.target.lm.keep_hidden = False


def _training_curve(drafter: Path) -> list[list]:
    """[tokens seen, held-out chain:3 tau] at each evaluation of the drafter's training run."""
    history = drafter / "history.json"
    if not history.exists():
        return []
    return [[h["tokens_seen"], h["chain_tau"]] for h in json.loads(history.read_text()) if "chain_tau" in h]


def _curves(dt, target) -> dict:
    from dovetail.models.fast_linear import set_linear_kernel

    curves = {}
    for kernel in ("stock", "mm"):
        set_linear_kernel(target, kernel)
        curves[f"target_{kernel}_ms"] = forward_curve(target)
        say(f"target forward ms ({kernel}): {curves[f'target_{kernel}_ms']}")
    set_linear_kernel(target, dt.config.target_kernel if dt.config.target_kernel != "mkldnn" else "stock")
    if dt.engine.draft:
        curves[f"draft_{dt.config.draft_precision}_ms"] = forward_curve(dt.engine.draft.lm.model, (1, 2, 4, 8, 10))
        say(f"draft forward ms: {curves[f'draft_{dt.config.draft_precision}_ms']}")
    return curves


def _add_ratios(report: dict) -> None:
    methods = report["methods"]
    for entry in methods.values():
        for base in ("target", "hf_assisted"):
            if base in methods:
                entry[f"vs_{base}"] = round(entry["tokens_per_s"] / methods[base]["tokens_per_s"], 3)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learning = {label: d["curve"] for label, d in report.get("drafters", {}).items() if d.get("curve")}
    curves = report.get("curves", {})
    panels = 1 + bool(curves) + bool(learning)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    speed_ax, *rest = axes[0]
    names = list(report["methods"])
    speeds = [report["methods"][n]["tokens_per_s"] for n in names]
    speed_ax.barh(names, speeds, color=["#888" if not n.startswith("dovetail") else "#2a7" for n in names])
    for i, v in enumerate(speeds):
        speed_ax.text(v, i, f" {v:.2f}", va="center")
    speed_ax.set_xlabel("tokens/s (HumanEval, greedy)")
    speed_ax.set_title(f"{report['settings']['target']} on {report['machine']['cpu']}, "
                       f"{report['machine']['cores']} cores")
    if curves:
        ax = rest.pop(0)
        for label, curve in curves.items():
            ax.plot([int(k) for k in curve], list(curve.values()), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per forward (KV cache 300)")
        ax.set_ylabel("forward ms")
        ax.legend()
        ax.set_title("forward cost by block size")
    if learning:
        ax = rest.pop(0)
        for label, curve in learning.items():
            ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label=f"{label}: held-out")
            live = report["methods"].get(f"dovetail-drafter[{label}][chain:3]")
            if live:
                ax.axhline(live["mean_accepted"], linestyle="--", color="#2a7", label=f"{label}: live, HumanEval")
        ax.set_xlabel("training tokens seen")
        ax.set_ylabel("chain:3 tau (greedy)")
        ax.set_title("drafter: tau against training tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
