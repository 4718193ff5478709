"""``python launch.py bench --suite draft``: what a draft level costs against what it proposes well,
by the draft's head cut (``--draft-vocab``) and its weights' precision.

For each draft variant (the packaged 0.5B with its whole head, cut to 16k, 32k and 48k tokens,
``models/draft_head.py``, and cut to 32k with its wider blocks re-encoded to 4 bits, precision
``q4``), beside the same loaded target:

  cost        the draft's one-token forward (a chain's tree level) after 150 tokens, and the
              target's, in alternating rounds so they share the host's noise: ms and the ratio
              draft / target (the start-up calibration's ``c``)
  acceptance  the draft pinned to a chain of 3 (no text proposers, no cost model) on short chat
              prompts that are not code (greedy and T = 0.8) and on HumanEval chat prompts
              (greedy): the chance that position 1, 2, 3 is accepted, and tokens per step
  identity    greedy outputs equal the target alone's, for every variant

``--prompts`` HumanEval problems (default 10; 3 here is plenty), ``--max-new-tokens`` per prompt
(default 256; 96 is enough), ``--reps`` forwards per round. JSON: ``<--results-dir>/<name>.json``.
"""

from __future__ import annotations

import time
from dataclasses import replace

from bench.common import humaneval_prompts, machine_info, one_token_ms, say, write_report

# (precision, head cut): the whole head, three cuts, and the draft re-encoded to 4-bit blocks
VARIANTS = (("native", 0), ("native", 16384), ("native", 32768), ("native", 49152), ("q4", 32768))
CHAT = ["Write a short poem about the sea at night.",
        "Tell me a story about a fox who learns to fly, in one paragraph.",
        "Describe a city of the future in five sentences.",
        "Explain why the sky is blue to a ten-year-old.",
        "Give me three tips for a job interview.",
        "What is the difference between weather and climate?"]
ROUNDS = 6


def _acceptance(engine, prompts, temperature: float, max_new: int) -> tuple[dict, list]:
    from dovetail.request import GenerationStats
    from dovetail.sampling import SamplingParams

    merged, outputs = GenerationStats(), []
    for ids in prompts:
        result = engine.generate(ids, max_new, SamplingParams(temperature), speculate=True)
        merged.accepted_per_step += result.stats.accepted_per_step
        outputs.append(result.token_ids)
    return {"by_position": [round(x, 3) for x in merged.acceptance_by_position(3)],
            "tau": round(merged.mean_accepted, 3), "steps": merged.steps or len(merged.accepted_per_step)}, outputs


def run(args) -> int:
    from dovetail.api import Dovetail
    from dovetail.config import EngineConfig
    from dovetail.describe import with_head_cut
    from dovetail.engine import SpeculativeEngine
    from dovetail.models.cached_lm import CachedLM
    from dovetail.models.lm_proposer import DraftProposer
    from dovetail.models.loading import encode_chat, load_causal_lm
    from dovetail.models.tree import TreeShape
    from dovetail.speculation import SpeculationSetup

    config = EngineConfig(target=args.target, draft=args.draft if args.draft not in (None, "auto") else
                          "qwen2.5-coder-0.5b-instruct", engine="inprocess", tree="chain:3", draft_vocab=0)
    report = {"machine": machine_info(), "settings": {
        "target": config.target, "draft": config.draft, "threads": config.threads, "tree": "chain:3",
        "max_new_tokens": args.max_new_tokens, "humaneval_prompts": args.prompts, "reps": args.reps}, "variants": {}}
    with Dovetail(config) as dt:
        base = dt.engine
        tok = dt.tokenizer
        chat = [encode_chat(tok, text) for text in CHAT]
        code = humaneval_prompts(tok, args.prompts)
        plain = {name: [base.generate(ids, args.max_new_tokens, speculate=False).token_ids for ids in prompts]
                 for name, prompts in (("chat", chat), ("code", code))}
        drafts, lms, load_s = {}, {"target": base.target.lm.fresh()}, {}
        for precision, cut in VARIANTS:
            spec = with_head_cut(replace(dt.draft, precision=precision), cut, dt.target_dir.name, say)
            t = time.perf_counter()
            lm = CachedLM(load_causal_lm(spec))
            label = (f"cut {cut}" if cut else "whole head") + (f", {precision}" if precision != "native" else "")
            load_s[label] = round(time.perf_counter() - t, 1)
            drafts[label] = DraftProposer(lm, TreeShape.chain(3), base.draft.vocab)
            lms[label] = lm.fresh()
        costs = one_token_ms(lms, args.reps, ROUNDS)
        say(f"one-token forward (ms): {costs}")
        for label, draft in drafts.items():
            engine = SpeculativeEngine(base.target, draft, base.eos, setup=SpeculationSetup(shape=TreeShape.chain(3)))
            row = {"draft_ms": costs[label], "target_ms": costs["target"],
                   "draft_over_target": round(costs[label] / costs["target"], 3), "load_s": load_s[label],
                   "draft_mb": round(sum(m.nbytes for m in draft.lm.model.modules() if hasattr(m, "q")) / 1e6)}
            row["chat_greedy"], chat_out = _acceptance(engine, chat, 0.0, args.max_new_tokens)
            row["chat_t0.8"], _ = _acceptance(engine, chat, 0.8, args.max_new_tokens)
            row["code_greedy"], code_out = _acceptance(engine, code, 0.0, args.max_new_tokens)
            row["greedy_identical"] = chat_out == plain["chat"] and code_out == plain["code"]
            report["variants"][label] = row
            say(f"{label}: c = {row['draft_over_target']}, chat greedy {row['chat_greedy']['by_position']}, "
                f"T=0.8 {row['chat_t0.8']['by_position']}, code {row['code_greedy']['by_position']}, "
                f"identical {row['greedy_identical']}")
    path = write_report(report, args)
    say(f"wrote {path}")
    return 0 if all(v["greedy_identical"] for v in report["variants"].values()) else 1
