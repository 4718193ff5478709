"""Batches as big as pay: ``--max-batch auto`` from the measured verify curve and the KV memory; and
chunked prefill: a long prompt joining running requests is prefilled one chunk per step while they
keep decoding, and every output stays the target's own."""

import json

import pytest
import torch

from dovetail.batching import MAX_AUTO_BATCH, bound, choose, kv_cap, resolve, throughput_gains
from dovetail.models.cached_lm import CachedLM
from dovetail.models.quantized import load_quantized
from dovetail.models.target import TargetVerifier
from dovetail.models.tree import TreeShape
from dovetail.request import Finished, Request, collect
from dovetail.sampling import SamplingParams
from dovetail.speculation import SpeculationSetup
from test_greedy_identity import EOS, make_engine, prompt
from test_quantized import gguf_model
from tiny_models import perturbed

# the 1.5B target on a 2-vCPU Zen 4 (docs/design.md 2a): ms by rows 1 / 2 / 3 / 4 / 8 / 16
NATIVE = {1: 0.038, 2: 0.046, 3: 0.050, 4: 0.059, 8: 0.092, 16: 0.167}


# -- auto batch ---------------------------------------------------------------------------------
def test_auto_batch_is_the_largest_whose_last_request_still_pays():
    gains = throughput_gains(NATIVE)
    # 2 rows: 2 / 46 ms against 1 / 38 ms; 5 rows interpolated between 4 and 8 (67.25 ms)
    assert gains[2] == pytest.approx(2 * 0.038 / 0.046 - 1)
    assert gains[4] == pytest.approx((4 / 0.059) / (3 / 0.050) - 1)  # +13%
    assert gains[5] == pytest.approx((5 / 0.06725) / (4 / 0.059) - 1)  # +9.7%: no longer pays
    assert choose(NATIVE).size == 4
    assert "+13%" in choose(NATIVE).why and "cap 16" in choose(NATIVE).why
    # a flat curve: the step to B gains B / (B - 1), which stays >= 10% up to 11
    assert choose({1: 0.05, 32: 0.05}).size == 11
    assert choose({1: 0.05, 32: 0.05}, cap=8).size == 8
    assert choose({1: 0.01, 2: 0.02, 4: 0.04}).size == 1  # each row costs a whole forward: never pays
    # a spike the monotone cut left flat (2 rows as dear as 4) does not stop the batch at 1
    assert choose({1: 0.04, 2: 0.08, 4: 0.08}).size == 4
    assert choose({1: 0.05, 8: 0.05}).size == 8  # no further than the measured rows


def test_auto_batch_fits_the_kv_memory_and_a_number_wins():
    tight = choose(NATIVE, kv=3)
    assert tight.size == 3 and "KV memory holds 3 requests" in tight.why
    assert choose(NATIVE, kv=40).size == 4
    assert kv_cap(10 * 2048 * 100, 2048 * 100) == 10 and kv_cap(5, 100) == 1 and kv_cap(None, 100) is None
    assert bound("auto") == MAX_AUTO_BATCH and bound("auto", 5) == 5 and bound(7, 5) == 7
    pinned = resolve(7, verifier=None, context_length=512)  # no curve is measured for a number
    assert (pinned.size, pinned.why) == (7, "--max-batch 7")


def test_an_engine_resolves_auto_from_the_cached_curve(isolated_home, pair):
    """The curve a cost key names (hand-written here, as calibration would have cached it) decides
    the batch; the KV cap cuts it; an explicit number is kept."""
    from dovetail.speculation.calibrate import cache_path

    key = {"test": "auto-batch"}
    path = cache_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"verify": NATIVE, "draft_level_s": None}))
    target = TargetVerifier(CachedLM(pair[0]))
    setup = SpeculationSetup(cost_key=key)
    from dovetail.engine import SpeculativeEngine

    engine = SpeculativeEngine(target, None, [EOS], max_batch="auto", setup=setup)
    assert engine.max_batch == engine.loop.max_batch == 4 and engine.info["max_batch"] == 4
    assert "auto" in engine.info["max_batch_why"]
    assert SpeculativeEngine(target, None, [EOS], max_batch="auto", setup=setup, kv_cap=2).max_batch == 2
    assert SpeculativeEngine(target, None, [EOS], max_batch=6, setup=setup).max_batch == 6


def test_auto_batch_measures_the_curve_when_none_is_cached(pair):
    target = TargetVerifier(CachedLM(pair[0]))
    from dovetail.engine import SpeculativeEngine

    said = []
    engine = SpeculativeEngine(target, None, [EOS], max_batch="auto", setup=SpeculationSetup(say=said.append))
    assert 1 <= engine.max_batch <= 11 and any("measuring the verify cost curve" in s for s in said)


# -- chunked prefill ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A native GGUF target (every row of its forward computed on its own: chunks are exact, bit
    for bit) and a float draft that mostly agrees with it."""
    model, folder, _ = gguf_model(tmp_path_factory.mktemp("gguf"), seed=4)
    return load_quantized(folder, "native"), perturbed(model, 0.03, seed=5)


@pytest.mark.parametrize("keep_hidden", [False, True], ids=["plain", "features"])
def test_a_prompt_prefilled_in_chunks_leaves_the_cache_a_whole_prefill_leaves(pair, keep_hidden):
    p = prompt(45, 3)
    whole, chunked = (TargetVerifier(CachedLM(pair[0], keep_hidden=keep_hidden)) for _ in range(2))
    first = whole.start(p, SamplingParams())
    chunks = [p[i:i + 8] for i in range(0, len(p), 8)]
    got = [chunked.prefill(c, SamplingParams(), i == 0, i == len(chunks) - 1) for i, c in enumerate(chunks)]
    assert got[:-1] == [None] * (len(chunks) - 1) and got[-1] == first
    assert chunked.lm.committed == whole.lm.committed == len(p)
    assert torch.equal(chunked.lm.extend([first, 7], logits_to_keep=0), whole.lm.extend([first, 7], logits_to_keep=0))
    if keep_hidden:
        assert torch.equal(chunked.prompt_features, whole.prompt_features)
    sampled = SamplingParams(temperature=0.9, seed=11)  # the first sampled token's position is the prompt's
    a, b = (TargetVerifier(CachedLM(pair[0])) for _ in range(2))
    assert a.start(p, sampled) == [b.prefill(c, sampled, i == 0, i == len(chunks) - 1)
                                   for i, c in enumerate(chunks)][-1]


def _logged(engine, log):
    """Log every chunk the loop's verifier is asked to prefill."""
    prefill = engine.loop.verifier.prefill

    def logging_prefill(request_id, tokens, params, first, final):
        log.append(("chunk", request_id, len(tokens)))
        prefill(request_id, tokens, params, first, final)

    engine.loop.verifier.prefill = logging_prefill


def _logged_loop(target, names: str, draft=None, shape=TreeShape.chain(1), **options):
    """The target alone (what each output must equal), and a loop in chunks of 8 whose prefill
    chunks and streamed events go into ``log``; ``emit(name)`` streams into ``events[name]`` too."""
    alone = make_engine(target, None, TreeShape.chain(1))
    engine = make_engine(target, draft, shape, prefill_chunk=8, **options)
    log, events = [], {name: [] for name in names}
    _logged(engine, log)

    def emit(name):
        return lambda event: (events[name].append(event), log.append((name, type(event).__name__)))

    return alone, engine.loop, log, events, emit


@pytest.mark.parametrize("draft,betting,together", [(False, False, True), (True, False, True), (True, True, True),
                                                    (True, False, False)],
                         ids=["plain", "speculating", "betting", "draft-after-target"])
def test_a_long_prompt_joins_in_chunks_while_the_running_request_streams(pair, draft, betting, together):
    """Request b (45 tokens, chunks of 8) joins while a decodes: six chunks, one per step, with a's
    tokens streamed between them; b decodes after its last chunk; both outputs are each prompt's
    own greedy output decoded alone."""
    target, draft_model = pair
    alone, loop, log, events, emit = _logged_loop(target, "ab", draft_model if draft else None, TreeShape(8, 4, 2),
                                                  betting=betting, max_batch=2)
    loop.prefill_together = together
    pa, pb = prompt(5, 1), prompt(45, 2)
    loop.admit(Request(pa, 60, request_id="a"), emit("a"))
    loop.step()
    assert not [e for e in log if e[0] == "chunk"]  # alone: the whole prompt at once
    loop.admit(Request(pb, 30, request_id="b"), emit("b"))
    while loop.live:
        loop.step()
    chunks = [i for i, e in enumerate(log) if e[0] == "chunk"]
    assert [log[i][2] for i in chunks] == [8, 8, 8, 8, 8, 5]
    for before, after in zip(chunks, chunks[1:]):  # a streamed between every two chunks
        assert ("a", "Tokens") in log[before:after], log
    assert log.index(("b", "Tokens")) > chunks[-1]  # b's first token once its prompt is all in
    for name, p, n in (("a", pa, 60), ("b", pb, 30)):
        assert collect(events[name]).token_ids == alone.generate(p, n).token_ids, name
    assert loop.verifier.states == {} and loop.verifier._chunks == {}
    if draft:  # both speculated (b's draft started with its first chunk, or after its last)
        assert all(collect(events[n]).stats.draft_tokens > 0 for n in "ab")
        assert sum(sum(collect(events[n]).stats.accepted_per_step) for n in "ab") > 0


def test_a_joining_prompt_goes_in_whole_once_nothing_else_decodes_and_a_cancel_frees_it(pair):
    """b (60 tokens) and c join while a streams: b's first chunk goes beside a's last step, the
    rest at once when nothing else decodes; c, cancelled while it waits, is never prefilled."""
    alone, loop, log, events, _ = _logged_loop(pair[0], "abc", max_batch=3)
    pa, pb, pc = prompt(4, 5), prompt(60, 6), prompt(30, 7)
    loop.admit(Request(pa, 3, request_id="a"), events["a"].append)
    loop.step()  # a streams its second token
    for name, p in (("b", pb), ("c", pc)):
        loop.admit(Request(p, 10, request_id=name), events[name].append)
    loop.cancelled["c"] = True  # cancelled while its prompt waits to go in
    while loop.live:
        loop.step()
    assert [(e[1], e[2]) for e in log] == [("b", 8), ("b", 52)]  # a finished with b's first chunk
    assert collect(events["b"]).token_ids == alone.generate(pb, 10).token_ids
    assert isinstance(events["c"][-1], Finished) and events["c"][-1].cancelled
    assert loop.verifier.states == {}


def test_a_burst_goes_in_together_and_a_short_prompt_joins_as_a_chunk(pair):
    """Requests admitted together at an idle loop are prefilled whole, and their first tokens go out
    together when the next step begins (the first does not stream a token and then wait for the
    others' prefills). A prompt shorter than a chunk that arrives while they stream goes in as one
    chunk beside a step, never as a prefill between two of their tokens. Outputs stay each
    prompt's own."""
    alone, loop, log, events, emit = _logged_loop(pair[0], "abc", max_batch=3)
    prompts = {"a": prompt(12, 1), "b": prompt(20, 2), "c": prompt(5, 3)}
    for name in "ab":
        loop.admit(Request(prompts[name], 6, request_id=name), emit(name))
    assert log == []  # both prefilled, nothing streamed yet
    loop.step()
    assert log[:2] == [("a", "Tokens"), ("b", "Tokens")]  # the first tokens, together, then the step's
    loop.admit(Request(prompts["c"], 6, request_id="c"), emit("c"))
    assert log[-1][0] != "c" and not [e for e in log if e[0] == "chunk"]  # not prefilled in admit
    loop.step()
    chunk = log.index(("chunk", "c", 5))
    assert log[chunk + 1:] == [("a", "Tokens"), ("b", "Tokens"), ("c", "Tokens")]  # beside a step
    while loop.live:
        loop.step()
    for name, p in prompts.items():
        assert collect(events[name]).token_ids == alone.generate(p, 6).token_ids, name
    assert loop.verifier.states == {}
