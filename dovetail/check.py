"""``launch.py check``: a self-test to run on your own machine and models before trusting them.

Each check prints PASS or FAIL with what it measured: the kernels of every path this CPU runs
against a float64 reference, speculation's greedy output against the target alone, a chi-square
test of speculative sampling against the target's exact distribution, the measured cost curve
and the speed with and without speculation. It ends with the settings it would use here, and
exits 1 if anything failed. It runs the in-process engine on this machine's threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

CHECK_PROMPTS = ("Write a Python function that returns the n-th Fibonacci number, with a docstring.",
                 "Explain in three sentences what a hash map is and when to use one.",
                 "Write a Python class for a stack with push, pop and peek, and a short example.")
KERNEL_ROWS = (1, 3, 8, 16)
P_VALUE_FLOOR = 1e-3  # a correct sampler fails the chi-square test this rarely
PAYS = 1.05  # speculation pays: at least this many times the target alone's decode speed
# the ways to run a GGUF draft model that check_draft_variants races: (precision, head cut)
DRAFT_VARIANTS = (("q4", True), ("native", True), ("native", False))


@dataclass
class Outcome:
    name: str
    passed: bool | None  # None: measured, nothing to pass or fail
    detail: str
    seconds: float = 0.0
    value: float | str | None = None  # speed: speculative over target-alone tok/s; draft variants: the flags

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "    "}[self.passed]
        return f"{mark}  {self.name}: {self.detail} ({self.seconds:.0f} s)"


def _timed(run) -> Outcome | None:
    t0 = time.perf_counter()
    outcome = run()
    if outcome is not None:  # None: a check that does not apply here
        outcome.seconds = time.perf_counter() - t0
    return outcome


def check_kernels() -> Outcome:
    """Every supported format through every kernel path this CPU runs, at 1-16 rows: the paths
    agree bit for bit, and the portable one matches float64 arithmetic on the same int8 values."""
    from gguf import quants

    from dovetail.kernels import ops
    from dovetail.kernels.formats import SUPPORTED
    from dovetail.kernels.packing import decode, pack, random_blocks

    paths = list(range(1, ops().best_isa() + 1))
    rows, cols, worst = 20, 512, 0.0
    for qtype in SUPPORTED:
        raw = random_blocks(qtype, rows, cols, seed=int(qtype))
        packed = pack(decode(raw, qtype, rows, cols))
        weights = torch.from_numpy(quants.dequantize(raw, qtype).reshape(rows, cols)).double()
        for m in KERNEL_ROWS:
            x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)) * 3
            xq, xs = ops().quantize_rows(x)
            exact = (xq.double().view(m, -1, 32) * xs[..., 0:1].double()).view(m, cols) @ weights.T
            outs = [ops().qmatmul(x, *packed.args(), *packed.scheme_args(), isa) for isa in paths]
            for isa, out in zip(paths[1:], outs[1:]):
                if not torch.equal(out, outs[0]):
                    return Outcome("kernels", False, f"the {ops().kernel_path_name(isa)} path disagrees with the portable one "
                                                     f"on {qtype.name} at {m} rows")
            error = float((outs[0].double() - exact).abs().max() / (exact.abs().max() * cols ** 0.5))
            worst = max(worst, error)
            if error > 1e-5:
                return Outcome("kernels", False, f"{qtype.name} at {m} rows is off float64 by {error:.1e} of its scale")
    names = ", ".join(ops().kernel_path_name(isa) for isa in paths)
    return Outcome("kernels", True, f"{len(SUPPORTED)} formats x {len(KERNEL_ROWS)} block sizes on every path "
                                    f"({names}): bit-identical, within {worst:.1e} of float64")


def check_greedy_identity(dt, prompts: list[list[int]], new_tokens: int) -> Outcome:
    """Speculation (the defaults, and a pinned chain where there is a draft model) against the
    target alone, greedy: the same tokens."""
    engines = _speculative_engines(dt)
    accepted = drafted = 0
    for i, prompt in enumerate(prompts):
        alone = dt.engine.generate(prompt, new_tokens, speculate=False).token_ids
        for label, engine in engines.items():
            result = engine.generate(prompt, new_tokens)
            if result.token_ids != alone:
                at = next(j for j, (a, b) in enumerate(zip(result.token_ids + [-1], alone + [-1])) if a != b)
                return Outcome("greedy identity", False, f"{label} differs from the target alone on prompt {i + 1} "
                                                         f"at token {at}")
            accepted += sum(result.stats.accepted_per_step)
            drafted += result.stats.draft_tokens
    share = f"; {accepted} of {drafted} drafted tokens accepted" if drafted else "; nothing was drafted"
    return Outcome("greedy identity", True, f"{len(prompts)} prompts x {new_tokens} tokens, "
                                            f"{' and '.join(engines)}: identical to the target alone{share}")


def check_sampling(dt, prompt: list[int], samples: int) -> Outcome:
    """Two sampled tokens (T = 1, top-k 4), the second through a speculative step, against the
    target's exact joint distribution (chi-square). Without a seed, a draft model samples its tree
    and verification rejects against the draft's own distribution."""
    from dovetail.models.verification import target_probs
    from dovetail.sampling import SamplingParams

    params = SamplingParams(temperature=1.0, top_k=4)
    lm = dt.engine.target.lm
    exact = {}
    with torch.inference_mode():
        first = target_probs(lm.fresh().extend(prompt)[-1:], params)[0].double()
        for t1 in torch.nonzero(first).flatten().tolist():
            if t1 in dt.eos_token_ids:  # the request ends there: a pair of one token
                exact[(t1,)] = float(first[t1])
                continue
            second = target_probs(lm.fresh().extend(prompt + [t1])[-1:], params)[0].double()
            for t2 in torch.nonzero(second).flatten().tolist():
                exact[(t1, t2)] = float(first[t1] * second[t2])
    engine = list(_speculative_engines(dt).values())[-1]  # the pinned chain: every step verifies a draft
    counts: dict = {}
    for _ in range(samples):
        out = tuple(engine.generate(prompt, 2, params).token_ids)
        counts[out] = counts.get(out, 0) + 1
    p = chi_square_pvalue(counts, exact, samples)
    detail = (f"p = {p:.3f} over {samples} pairs of tokens at T = 1, top-k 4 against the target's exact "
              f"distribution ({len(exact)} pairs possible)")
    return Outcome("sampling", p >= P_VALUE_FLOOR, detail)


def chi_square_pvalue(counts: dict, probs: dict, n: int) -> float:
    """Goodness of fit of ``counts`` (of n draws) to ``probs``; cells expected below 5 pooled."""
    keys = sorted(probs, key=probs.get, reverse=True)
    big = [k for k in keys if probs[k] * n >= 5]
    observed = np.array([counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)], dtype=float)
    expected = np.array([probs[k] * n for k in big] + [n * max(0.0, 1 - sum(probs[k] for k in big))])
    keep = expected > 0
    if observed[~keep].sum() > 0:
        return 0.0  # a draw the target can never make
    observed, expected = observed[keep], expected[keep]
    if len(observed) < 2:
        return 1.0
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor((len(observed) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def check_costs(dt) -> Outcome:
    """The target's forward by rows and the draft's per tree level, measured now (not cached)."""
    from dovetail.kernels import arena
    from dovetail.local import LocalProposer, LocalVerifier
    from dovetail.speculation.calibrate import measured_costs

    engine = dt.engine
    draft = engine.draft if engine.draft is not None and not engine.draft.reads_features else None
    costs = measured_costs(LocalVerifier(engine.target.fresh), LocalProposer(draft.fresh) if draft else None,
                           engine.context_length)
    verify = costs["verify"]
    shown = [r for r in (1, 2, 4, 8, 16) if r in verify]
    detail = ("verify " + " / ".join(f"{verify[r] * 1e3:.1f}" for r in shown) + f" ms at {'/'.join(map(str, shown))} "
              "rows (" + " / ".join(f"{verify[r] / verify[1]:.2f}" for r in shown) + "x one token)")
    if costs["draft_level_s"]:
        detail += f"; the draft {costs['draft_level_s'][1] * 1e3:.1f} ms a tree level"
    detail += "; " + arena.describe()
    return Outcome("cost curve", None, detail)


def check_draft_variants(dt, prompts: list[list[int]], new_tokens: int) -> Outcome | None:
    """Each way to run a GGUF draft model here -- its wider blocks re-encoded to 4 bits (``q4``)
    or as the file has them (``native``), its head cut to the most frequent tokens or whole --
    timed (a tree level against the target's one-row forward, as the cost model measures them)
    and raced: the draft pinned to a chain of 2 against the target alone, greedy, alternating on
    the check's prompts. ``value`` is the cheapest variant (by a level's cost) that paid, as its
    flags, or None when none did; None for a draft that is not a GGUF file."""
    from dovetail.describe import describe_model, with_head_cut
    from dovetail.engine import SpeculativeEngine
    from dovetail.local import LocalProposer, LocalVerifier
    from dovetail.models.cached_lm import CachedLM
    from dovetail.models.lm_proposer import DraftProposer
    from dovetail.models.loading import load_causal_lm
    from dovetail.models.spec import GGUF_PRECISIONS
    from dovetail.models.tree import TreeShape
    from dovetail.speculation import SpeculationSetup
    from dovetail.speculation.calibrate import measure

    base = dt.engine
    if base.draft is None or base.draft.reads_features or dt.draft_precision not in GGUF_PRECISIONS:
        return None
    for prompt in prompts:  # warm the target's caches for these prompts' lengths
        base.generate(prompt, new_tokens, speculate=False)
    rows, best = [], None
    for precision, cut in DRAFT_VARIANTS:
        spec = describe_model(dt.draft_dir, precision, "draft", weights=False)
        spec = with_head_cut(spec, spec.default_head_cut if cut else 0, dt.target_dir.name)
        draft = DraftProposer(CachedLM(load_causal_lm(spec)), TreeShape.chain(2), base.draft.vocab)
        forward, level = measure(LocalVerifier(base.target.fresh), [1], LocalProposer(draft.fresh), [1])
        forward_s, level = forward[1], level[1]
        engine = SpeculativeEngine(base.target, draft, base.eos, setup=SpeculationSetup(shape=TreeShape.chain(2)))
        decode = {"alone": 0.0, "draft": 0.0}  # greedy: both decode the same tokens
        accepted = steps = 0
        for prompt in prompts:
            for label in ("alone", "draft"):
                stats = (base.generate(prompt, new_tokens, speculate=False) if label == "alone"
                         else engine.generate(prompt, new_tokens)).stats
                decode[label] += stats.total_s - stats.prefill_s
                if label == "draft":
                    accepted += sum(stats.accepted_per_step)
                    steps += len(stats.accepted_per_step)
        ratio = decode["alone"] / max(decode["draft"], 1e-9)
        flags = f"--draft-precision {precision}" + ("" if cut else " --draft-vocab 0")
        rows.append(f"{flags}: a level {level * 1e3:.1f} ms = {level / forward_s:.2f} of the target's forward, "
                    f"{accepted / max(steps, 1):.2f} of 2 drafted tokens accepted a step, {ratio:.2f}x the target alone")
        if ratio >= PAYS and (best is None or level < best[1]):
            best = (flags, level)
        del engine, draft  # one variant's weights in memory at a time
    return Outcome("draft variants", None, "; ".join(rows), value=best[0] if best else None)


def check_speed(dt, prompt: list[int], new_tokens: int) -> Outcome:
    """Decode tok/s (prefill excluded) with the defaults and with the target alone, same prompt."""
    rates = {}
    for label, speculate in (("target alone", False), ("speculative", True)):
        stats = dt.engine.generate(prompt, new_tokens, speculate=speculate).stats
        rates[label] = stats.new_tokens / max(stats.total_s - stats.prefill_s, 1e-9)
    ratio = rates["speculative"] / rates["target alone"]
    return Outcome("speed", None, f"speculative {rates['speculative']:.2f} tok/s, target alone "
                                  f"{rates['target alone']:.2f} ({ratio:.2f}x) on a code prompt", value=ratio)


def _speculative_engines(dt) -> dict:
    """The defaults, and (with a draft model) the draft pinned to a chain of 3 on every step, so
    verification is exercised even where the cost model would decode alone."""
    from dovetail.engine import SpeculativeEngine
    from dovetail.models.tree import TreeShape
    from dovetail.speculation import SpeculationSetup

    base = dt.engine
    engines = {"the defaults": base}
    if base.draft is not None:
        engines["a chain of 3"] = SpeculativeEngine(base.target, base.draft, base.eos,
                                                    setup=SpeculationSetup(shape=TreeShape.chain(3)))
    return engines


def run_check(config, samples: int = 150, new_tokens: int = 48, say=print) -> int:
    """Every check in turn on ``config``'s models (in process); 0 when all passed, else 1."""
    from dovetail.api import Dovetail
    from dovetail.models.loading import encode_chat
    from dovetail.speculation.learned import describe as describe_learned, learned_path

    t0 = time.perf_counter()
    outcomes = [_timed(check_kernels)]
    say(outcomes[-1].line())
    config.engine = "inprocess"
    with Dovetail(config) as dt:
        dt.load()
        prompts = [encode_chat(dt.tokenizer, text) for text in CHECK_PROMPTS]
        for run in (lambda: check_greedy_identity(dt, prompts, new_tokens),
                    lambda: check_sampling(dt, prompts[1], samples), lambda: check_costs(dt)):
            outcomes.append(_timed(run))
            say(outcomes[-1].line())
        learnt = describe_learned(learned_path(dt.speculation_setup().cost_key))
        say("learnt by earlier runs here (acceptance by depth, per proposer and temperature class): "
            + ("\n  " + "\n  ".join(learnt) if learnt else "nothing yet"))
        outcomes.append(_timed(lambda: check_speed(dt, prompts[0], 2 * new_tokens)))
        say(outcomes[-1].line())
        speed = outcomes[-1].value
        variants = _timed(lambda: check_draft_variants(dt, prompts, new_tokens))
        if variants is not None:
            say(variants.line())
        failed = [o.name for o in outcomes if o.passed is False]
        say(f"{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'} "
            f"({time.perf_counter() - t0:.0f} s)")
        say("recommended here: " + _recommendation(dt, speed, variants.value if variants else None))
    return 1 if failed else 0


def _recommendation(dt, ratio: float, draft_flags: str | None = None) -> str:
    cfg = dt.config
    engine = dt.engine_kind()
    parts = [f"--engine {engine}", f"--threads {cfg.threads}" if engine == "inprocess" else "",
             f"--target-precision {dt.target_precision}"]
    if draft_flags:
        parts.append(draft_flags + " (the cheapest draft variant that paid here)")
    if cfg.draft is None:
        parts.append("--no-draft (as given)")
    elif ratio >= PAYS:
        parts.append(f"--draft {cfg.draft} (speculation paid {ratio:.2f}x here)")
    else:
        parts.append(f"--draft {cfg.draft}: it cost as much as it saved here ({ratio:.2f}x); the cost model keeps it "
                     "from losing, and it pays on repetitive text (code edits, long answers quoting the prompt)")
    return " ".join(p for p in parts if p)
