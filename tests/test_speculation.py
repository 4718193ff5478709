"""Proposers without a model, merged trees, and the cost model that picks each step's speculation.

Every engine-level test checks token identity with the target's own greedy decoding (or the
chi-square fit of sampled output), whatever the proposers and the cost model chose.
"""

import numpy as np
import pytest
import torch

from dovetail.decode import Drafting, Proposal, StepTimes, Verdict
from dovetail.engine import SpeculativeEngine
from dovetail.errors import UserError
from dovetail.models.cached_lm import CachedLM
from dovetail.models.lm_proposer import DraftProposer
from dovetail.models.target import TargetVerifier
from dovetail.models.tree import DraftTree, TreeShape, merge_trees
from dovetail.request import Request
from dovetail.sampling import SamplingParams
from dovetail.speculation import SpeculationSetup, parse_proposers, pricing
from dovetail.speculation.cost import AcceptanceRates, Confidence, VerifyCurve, expected_tokens
from dovetail.speculation.lookup import NgramProposer, SuffixCache, SuffixProposer, SuffixTrie
from dovetail.speculation.members import Member
from dovetail.speculation.learned import describe as describe_learned
from dovetail.speculation.options import CATCH_UP_STEPS, HEATS, PRIOR, PROBE_FIRST
from dovetail.speculation.speculator import Speculator
from tiny_models import actor_engine, hf_greedy, perturbed, tiny_model

EOS = 1


def _tree(proposer, request_id, new_tokens, shape=TreeShape(8, 4, 2)):
    (proposal,) = proposer.propose([Drafting(request_id, 1, new_tokens, None, shape)])
    return proposal.tree


def _paths(tree):
    """Every root-to-leaf token path of a tree, root excluded."""
    leaves = [n for n in range(len(tree)) if not len(tree.children(n))]
    return sorted(tuple(int(tree.tokens[m]) for m in tree.path_to(n)[1:]) for n in leaves)


# -- the model-free proposers -----------------------------------------------------------------
def test_ngram_proposes_what_followed_the_last_tokens():
    p = NgramProposer(min_n=2, max_n=3)
    p.start("r", [5, 6, 7, 8, 9, 40, 5, 6])
    assert _paths(_tree(p, "r", [7])) == [(8, 9, 40, 5)]  # [5, 6, 7] occurred: what followed it
    p.start("s", [5, 6, 1, 2, 3, 5, 6, 4, 4, 4, 9, 5])
    tree = _tree(p, "s", [6], TreeShape(9, 4, 2))
    assert _paths(tree) == [(1, 2, 3, 5), (4, 4, 4, 9)]  # two continuations: a tree
    assert int(tree.tokens[tree.children(0)[0]]) == 4  # the most recent occurrence first
    p.start("t", [1, 2, 3])
    assert len(_tree(p, "t", [4])) == 1  # nothing matches: the root alone


def test_suffix_trie_counts_every_substring_and_forgets_exactly():
    trie = SuffixTrie(depth=4)
    trie.add([1, 2, 3, 1, 2, 4])
    node, length = trie.match([9, 1, 2], longest=8)
    assert length == 2 and trie.as_nested(node) == [2, {3: [1, {1: [1, {}]}], 4: [1, {}]}]
    assert sorted(trie.continuations(node)([])) == [(3, 0.5), (4, 0.5)]
    fed = SuffixTrie(depth=4)
    fed.feed([1, 2, 3])
    fed.feed([1, 2, 4])  # fed in pieces: the same counts as added whole
    assert fed.as_nested() == trie.as_nested()
    trie.add([7, 7, 7, 8])
    trie.remove([7, 7, 7, 8])
    assert trie.as_nested() == fed.as_nested()
    trie.remove([1, 2, 3, 1, 2, 4])
    assert trie.as_nested() == [0, {}] and trie.kids == {0: {}} and trie.counts == {0: 0}  # no node left behind


def test_a_suffix_trie_adds_nothing_to_the_garbage_collectors_walk():
    """A server's cache of recent outputs holds millions of trie nodes: as containers the collector
    tracks, every full collection walked them all. Here they are dicts of integers alone, which
    CPython does not track: one tracked object a trie, however large."""
    import gc

    trie = SuffixTrie(depth=24)
    trie.add(list(range(2000)) * 2)
    assert len(trie.counts) > 20_000
    tracked = [d for d in trie.kids.values() if gc.is_tracked(d)]
    assert not tracked and not gc.is_tracked(trie.counts) and gc.is_tracked(trie.kids)


def test_suffix_proposer_weights_continuations_by_frequency():
    p = SuffixProposer(min_prob=0.0)
    p.start("r", [1, 2, 3, 1, 2, 3, 1, 2, 4, 1])
    tree = _tree(p, "r", [2], TreeShape(8, 2, 2))
    first, second = tree.children(0)
    assert (int(tree.tokens[first]), int(tree.tokens[second])) == (3, 4)  # seen twice, then once


def test_suffix_cache_is_bounded_and_never_crosses_tenants():
    cache = SuffixCache(depth=8, max_tokens=12)
    secret = [50, 51, 52, 53, 54, 55]
    p = SuffixProposer(cache)
    p.start("a", [9], tenant="alice")
    p.propose([Drafting("a", 1, secret, None, TreeShape.chain(3))])
    p.end("a")  # alice's output joins her tenant's cache
    p.start("b", [50, 51], tenant="bob")
    assert len(_tree(p, "b", [52])) == 1, "bob was offered alice's text"
    p.start("c", [50, 51], tenant="alice")
    assert _paths(_tree(p, "c", [52], TreeShape.chain(3))) == [(53, 54, 55)]
    for i in range(3):  # more than max_tokens of newer outputs push the oldest out
        p.start(f"x{i}", [9], tenant="alice")
        p.propose([Drafting(f"x{i}", 1, [60 + i] * 6, None, None)])
        p.end(f"x{i}")
    assert cache.tokens <= 12
    p.start("d", [50, 51], tenant="alice")
    assert len(_tree(p, "d", [52])) == 1


def test_merged_trees_share_prefixes_once():
    a = DraftTree([9, 1, 2, 3], [-1, 0, 1, 0])
    b = DraftTree([9, 1, 4, 1], [-1, 0, 1, 2])
    merged = merge_trees([a, b])
    assert _paths(merged) == sorted([(1, 2), (1, 4, 1), (3,)])
    assert len(merged) == 6  # root, 1, 3, 2, 4, 1
    assert [int(merged.tokens[c]) for c in merged.children(0)] == [1, 3]  # first tree's order kept


def test_parse_proposers():
    assert parse_proposers("auto").text == ("ngram", "suffix") and not parse_proposers("auto").combined
    assert parse_proposers("ngram+suffix") == parse_proposers("ngram+suffix") and parse_proposers("ngram").model is None
    assert parse_proposers("model+suffix").model == "auto"
    with pytest.raises(UserError):
        parse_proposers("a+b")
    with pytest.raises(UserError):
        parse_proposers("ngram++suffix")


# -- the cost model on synthetic curves ------------------------------------------------------------
class FixedText:
    """A model-free proposer that always offers the same chain after the last token."""

    def __init__(self, chain):
        self.chain = list(chain)

    def start(self, request_id, prompt_ids, params=None, tenant=""):
        pass

    def propose(self, items):
        return [Proposal(DraftTree([i.new_tokens[-1]] + self.chain[:i.shape.depth],
                                   list(range(-1, min(len(self.chain), i.shape.depth)))), 0.0) for i in items]

    def end(self, request_id):
        pass


class FakeModel(FixedText):
    """A 'draft model' whose chains are free to grow (its cost comes from ``step_s``)."""


def _speculator(curve_ms, acceptance, model_step_ms=None, text_acceptance=None):
    members = [Member("ngram", FixedText(range(10, 20)), free=True)]
    options = [("ngram",)]
    if model_step_ms is not None:
        members.append(Member("model", FakeModel(range(30, 40)), step_s=model_step_ms / 1e3))
        options.append(("model",))
    spec = Speculator(members, options, VerifyCurve({r: ms / 1e3 for r, ms in curve_ms.items()}))
    for key, rates in ((("model",), acceptance), (("ngram",), text_acceptance or acceptance)):
        for width in (1, 2):  # a wide model tree: as likely as the chain here, so never better
            if (key, width) in spec.arms:
                spec.acceptance[((key, width), "greedy")] = AcceptanceRates(6, list(rates), prior_weight=1e6)
    spec.start("r", [1, 2, 3])
    return spec


def _best_by_arithmetic(curve, rates, step_s=0.0):
    """The depth the rate formula says, 0 for none."""
    rate = {0: 1 / curve.at(1)}
    for k in range(1, 7):
        rate[k] = expected_tokens(rates, k) / (curve.at(k + 1) + k * step_s)
    return max(rate, key=rate.get)


def test_cost_model_picks_none_when_verification_is_steep_and_acceptance_low():
    steep = {1: 40, 2: 80, 4: 160, 8: 320, 16: 640, 32: 1280}
    spec = _speculator(steep, [0.3] * 6, model_step_ms=15)
    (proposal,) = spec.propose([Drafting("r", 1, [4])])
    assert proposal.choice is None and len(proposal.tree) == 1
    assert _best_by_arithmetic(spec.curve, [0.3] * 6) == 0


@pytest.mark.parametrize("acceptance,curve", [
    ([0.9] * 6, {1: 40, 2: 41, 4: 43, 8: 60, 16: 120, 32: 240}),  # flat: deep chains pay
    ([0.8, 0.5, 0.3, 0.2, 0.1, 0.1], {1: 40, 2: 46, 4: 59, 8: 92, 16: 167, 32: 330}),
    ([0.6] * 6, {1: 40, 2: 50, 4: 70, 8: 110, 16: 190, 32: 350}),
])
def test_cost_model_picks_the_depth_the_arithmetic_says(acceptance, curve):
    spec = _speculator(curve, acceptance)
    (proposal,) = spec.propose([Drafting("r", 1, [4])])
    depth = proposal.choice.shape.depth if proposal.choice else 0
    assert depth == _best_by_arithmetic(spec.curve, acceptance)
    assert proposal.choice is None or proposal.choice.proposers == ("ngram",)


def test_cost_model_counts_the_draft_models_cost():
    """Same acceptance for both: the free proposer wins over a model whose forwards cost time;
    a model with much better acceptance wins despite them."""
    curve = {1: 40, 2: 44, 4: 52, 8: 80, 16: 150, 32: 300}
    spec = _speculator(curve, [0.7] * 6, model_step_ms=15, text_acceptance=[0.7] * 6)
    (proposal,) = spec.propose([Drafting("r", 1, [4])])
    assert proposal.choice.proposers == ("ngram",)
    spec = _speculator(curve, [0.95] * 6, model_step_ms=2, text_acceptance=[0.05] * 6)
    (proposal,) = spec.propose([Drafting("r", 1, [4])])
    assert proposal.choice.proposers == ("model",)


def test_a_batch_shares_its_draft_model():
    """Four requests: a model whose level costs 8 ms for one tree and 10 ms for eight (grown
    together) pays for the batch, though no request's turn alone justifies delaying the other
    three; charged one request at a time (8 ms a tree a level) it does not."""
    curve = {1: 40, 2: 41, 4: 43, 8: 46, 16: 52, 32: 70}
    for together, expected in ((True, ("model",)), (False, None)):
        spec = _speculator(curve, [0.95] * 6, model_step_ms=8, text_acceptance=[0.05] * 6)
        if together:
            spec.members["model"].levels = VerifyCurve({1: 0.008, 2: 0.0085, 4: 0.009, 8: 0.010})
        for rid in "abcd":
            spec.start(rid, [1, 2, 3])
        proposals = spec.propose([Drafting(rid, 1, [4]) for rid in "abcd"])
        assert {p.choice.proposers if p.choice else None for p in proposals} == {expected}
        assert spec.members["model"].level_s(3) == pytest.approx(0.00875 if together else 0.024)


def test_a_skipped_models_catch_up_is_priced():
    """A model not run last step feeds every token it missed in its next first forward: those rows
    (its level curve at that many rows, less the usual one) are part of that option's cost, spread
    over the steps the caught-up model then serves (``CATCH_UP_STEPS``), and tip the choice when
    they outweigh its gain over those steps; once run, its next step costs the usual again."""
    curve = {1: 40, 2: 42, 4: 46, 8: 54, 16: 70, 32: 102}
    spec = _speculator(curve, [0.8] * 6, model_step_ms=10, text_acceptance=[0.01] * 6)
    spec.members["model"].levels = VerifyCurve({1: 0.010, 2: 0.011, 4: 0.013, 8: 0.017})
    missed = list(range(100, 180))  # 80 tokens committed while the model was not run
    text = {("r", "ngram"): DraftTree([4], [-1])}
    options = pricing.offer(spec._ask("r", text), spec.arms, spec._costs())
    usual = {(o.width, o.depth): o.draft_s for o in options if o.key == ("model",)}
    spec.states["r"].pending["model"].extend(missed)
    options = pricing.offer(spec._ask("r", text), spec.arms, spec._costs())
    extra = spec.members["model"].level_s(80) - spec.members["model"].level_s(1)
    assert extra == pytest.approx(0.017 + 72 * 0.001 - 0.010)
    for o in options:
        if o.key == ("model",):
            assert o.catch_up_s == pytest.approx(extra)
            assert o.draft_s == pytest.approx(usual[(o.width, o.depth)] + extra / CATCH_UP_STEPS)
    # an 80-token catch-up (79 ms) is worth the model's gain over the next steps ...
    spec.start("late", [1, 2, 3])
    (late,) = spec.propose([Drafting("late", 1, missed)])
    assert late.choice is not None and late.choice.proposers == ("model",), late.choice
    # ... a 1,000-token one (1 s) is not
    spec.start("far", [1, 2, 3])
    (far,) = spec.propose([Drafting("far", 1, list(range(100, 1100)))])
    assert far.choice is None or far.choice.proposers != ("model",), far.choice
    (again,) = spec.propose([Drafting("late", 2, [5, 6])])  # run last step: no catch-up
    assert again.choice.proposers == ("model",) and spec.states["late"].catch_up_s == 0.0


def test_confidence_cuts_where_nodes_stop_paying():
    """The cut-off is the lowest draft probability from which on every bucket commits at least
    what a node costs; it never rises above the top bucket's edge (those are always tried)."""
    assert Confidence().lowest(0.55) == pytest.approx(0.5)  # before anything is seen: the midpoints
    seen = Confidence()
    for _ in range(100):
        for p in (0.05, 0.15, 0.25, 0.35):
            seen.observe(p, False)
        for p in (0.45, 0.55, 0.65, 0.75, 0.85, 0.95):
            seen.observe(p, True)
    assert seen.lowest(0.3) == pytest.approx(0.4) and seen.lowest(0.0) == 0.0
    assert seen.lowest(1.5) == Confidence.TOP


class RecordingModel(FakeModel):
    """A fake draft model that records the shapes it is asked to grow."""

    def __init__(self, chain):
        super().__init__(chain)
        self.shapes = []

    def propose(self, items):
        self.shapes += [i.shape for i in items]
        return super().propose(items)


def test_the_models_tree_is_cut_where_its_nodes_stop_paying():
    """Once the draft's unlikely nodes are seen never to commit, its trees come with cut-offs
    above them (and under its likely ones); learnt per arm, from every node of every tree."""
    curve = {1: 40, 2: 50, 4: 70, 8: 110, 16: 190, 32: 350}
    spec = _speculator(curve, [0.9] * 6, model_step_ms=5, text_acceptance=[0.01] * 6)
    spec.cut_offs = True
    model = spec.members["model"].proposer = RecordingModel(range(30, 40))
    (first,) = spec.propose([Drafting("r", 1, [4])])
    assert first.choice.proposers == ("model",) and model.shapes[-1].p_keep == 0.0  # nothing seen yet
    for step in range(2, 60):  # nodes the draft gives 0.92 and 0.55 are accepted, 0.25 never
        tree = DraftTree([4, 30, 31, 32], [-1, 0, 1, 2], scores=np.log([1.0, 0.92, 0.55, 0.25]))
        spec.learn("r", Proposal(tree, 0.0, choice=first.choice), Verdict([30, 31, 9], [0, 1, 2]),
                   StepTimes(0.07, 4, 10))
    (cut,) = spec.propose([Drafting("r", 2, [5])])
    shape = model.shapes[-1]
    assert cut.choice.shape == shape and 0.2 < shape.p_keep <= 0.5 and shape.p_grow >= shape.p_keep


def test_cost_model_picks_the_width_the_arithmetic_says():
    """A lone model has two arms, a chain and two children per expanded node (twice the rows):
    the wide one wins where verification is flat and a second child is often right, not where
    rows are dear."""
    for curve, wide_wins in (({1: 40, 2: 41, 4: 42, 8: 44, 16: 50, 32: 70}, True),
                             ({1: 40, 2: 70, 4: 130, 8: 250, 16: 490, 32: 970}, False)):
        spec = _speculator(curve, [0.6] * 6, model_step_ms=2, text_acceptance=[0.01] * 6)
        spec.acceptance[((("model",), 2), "greedy")] = AcceptanceRates(6, [0.9] * 6, prior_weight=1e6)
        (proposal,) = spec.propose([Drafting("r", 1, [4])])
        width = proposal.choice.width if proposal.choice else 0
        assert (width == 2) == wide_wins, (curve, proposal.choice)
        if wide_wins:
            assert proposal.choice.shape.top_k == 2 and str(proposal.choice).startswith("model*2@")


def test_cost_model_learns_the_curve_by_context():
    curve = VerifyCurve({1: 0.040, 4: 0.060, 16: 0.170})
    assert curve.at(2) == pytest.approx(0.040 + 0.020 / 3)
    for _ in range(30):  # at 4k tokens one row costs twice as much
        curve.observe(1, 4096, 0.080)
    assert curve.at(1, 4096) == pytest.approx(0.080)
    # rows never seen there: all of one row's extra is taken as per-row (attention is rows x context)
    assert curve.at(4, 4096) == pytest.approx(0.060 + 4 * 0.040)
    assert curve.at(4, 100) == pytest.approx(0.060)
    # a longer context with nothing seen borrows the line, doubled per bucket
    assert curve.at(1, 8192) == pytest.approx(0.040 + 2 * 0.040)
    for _ in range(30):  # a second row count seen: the extra is the line through both
        curve.observe(4, 4096, 0.130)  # extra 0.070 at 4 rows, 0.040 at 1: 0.030 + 0.010 per row
    assert curve.at(4, 4096) == pytest.approx(0.130)
    assert curve.at(16, 4096) == pytest.approx(0.170 + 0.030 + 16 * 0.010)


def test_speculator_learns_acceptance_and_switches_off_then_probes():
    curve = {1: 40, 2: 48, 4: 64, 8: 96, 16: 160, 32: 288}
    spec = _speculator(curve, [0.9] * 6)
    spec.acceptance[((("ngram",), 1), "greedy")] = AcceptanceRates(6, 0.9, prior_weight=2)
    chosen = []
    for step in range(1, 40):
        (proposal,) = spec.propose([Drafting("r", step, [4])])
        chosen.append(proposal.choice)
        verdict = Verdict([5], [0])  # nothing is ever accepted
        rows = len(proposal.tree)  # the step cost what the curve says
        spec.learn("r", proposal, verdict, StepTimes(spec.curve.base_at(rows), rows, 10))
    assert chosen[0] is not None and any(c is None for c in chosen[-10:])
    offs = [i for i, c in enumerate(chosen) if c is None]
    assert offs and any(c is not None for c in chosen[offs[0]:]), "a losing option is never probed again"


def test_an_unverified_text_tree_is_judged_against_what_was_committed():
    """A model-free tree that was not verified still learns its acceptance from the committed
    tokens, so text that starts repeating switches speculation back on at once, not at the next
    probe; and it is scored exactly as far as those tokens reach."""
    from dovetail.speculation.speculator import _matched

    tree = DraftTree([1, 10, 20, 11], [-1, 0, 0, 1])  # 10 -> 11, or 20
    assert _matched(tree, [20]) == (1, 1) and _matched(tree, [10, 11, 7]) == (2, 2)
    assert _matched(tree, [10, 7]) == (2, 1) and _matched(tree, [7]) == (1, 0) and _matched(tree, []) == (0, 0)

    curve = {1: 40, 2: 48, 4: 64, 8: 96, 16: 160, 32: 288}
    spec = _speculator(curve, [0.9] * 6)
    arm = (("ngram",), 1)
    spec.acceptance[(arm, "greedy")] = AcceptanceRates(6, 0.9, prior_weight=2)

    def step(n, committed):
        (proposal,) = spec.propose([Drafting("r", n, [4])])
        path = [0] + [i + 1 for i, t in enumerate(committed[:-1]) if t == 10 + i]
        spec.learn("r", proposal, Verdict(committed, path[:len(committed)]),
                   StepTimes(spec.curve.base_at(len(proposal.tree)), len(proposal.tree), 10))
        return proposal.choice

    n = 0
    while step(n := n + 1, [5]) is not None:  # nothing matches: it switches off
        assert n < 20
    low = spec._engine_rates(arm, "greedy").rate(1)
    off = [step(n := n + 1, [10]) for _ in range(3)]  # the text starts matching
    assert spec._engine_rates(arm, "greedy").rate(1) > low
    assert off[0] is None and any(c is not None for c in off), "matching text was not noticed before a probe"
    assert spec.probing.probe_after[(arm, "greedy")] == PROBE_FIRST, "the comeback was a probe"


def test_acceptance_and_probing_are_engine_wide_and_apart_for_sampled_requests():
    """What a sampled request teaches the cost model leaves the greedy figures alone, and a new
    request continues the engine's probing schedule instead of re-probing every losing option."""
    curve = {1: 40, 2: 48, 4: 64, 8: 96, 16: 160, 32: 288}
    spec = _speculator(curve, [0.9] * 6)
    arm = (("ngram",), 1)
    spec.acceptance[(arm, "T<=1")] = AcceptanceRates(6, 0.9, prior_weight=2)

    def step(rid, n):
        (proposal,) = spec.propose([Drafting(rid, n, [4])])
        rows = len(proposal.tree)
        spec.learn(rid, proposal, Verdict([5], [0]), StepTimes(spec.curve.base_at(rows), rows, 10))
        return proposal.choice

    spec.start("s", [1, 2, 3], params=SamplingParams(temperature=1.0))
    first = [step("s", n) for n in range(1, 40)]  # nothing a sampled request drafts is accepted
    assert first[0] is not None and first[-1] is None
    assert spec.acceptance[(arm, "T<=1")].rate(1) < 0.5 and spec._engine_rates(arm, "greedy").rate(1) == pytest.approx(0.9)
    spec.start("t", [1, 2, 3], params=SamplingParams(temperature=1.0))
    assert all(step("t", n) is None for n in range(1, 9)), "a new request re-probed at once"
    spec.start("g", [1, 2, 3])  # a greedy request still expects its own figure
    assert step("g", 1) is not None



def test_what_the_engine_learnt_is_kept_for_the_next_process(tmp_path):
    """A fresh speculator of the same configuration starts from the acceptance and probing schedule
    an earlier one kept on disk, apart by temperature class, instead of from the optimistic prior;
    an unreadable file is a fresh start, not an error."""
    curve = {1: 40, 2: 48, 4: 64, 8: 96, 16: 160, 32: 288}
    path = tmp_path / "costs" / "abc.learned.json"
    arm = (("ngram",), 1)

    def run(spec, rid, params, steps):
        spec.start(rid, [1, 2, 3], params=params)
        choices = []
        for n in range(1, steps + 1):
            (proposal,) = spec.propose([Drafting(rid, n, [4])])
            rows = len(proposal.tree)
            spec.learn(rid, proposal, Verdict([5], [0]), StepTimes(spec.curve.base_at(rows), rows, 10))
            choices.append(proposal.choice)
        spec.end(rid)
        return choices

    def fresh():
        members = [Member("ngram", FixedText(range(10, 20)), free=True)]
        return Speculator(members, [("ngram",)], VerifyCurve({r: ms / 1e3 for r, ms in curve.items()}),
                          learned_at=path)

    first = fresh()
    hot = SamplingParams(temperature=1.5)
    assert run(first, "a", hot, 40)[0] is not None  # the prior is optimistic: it drafts, and learns it loses
    assert path.exists()
    learnt = first.acceptance[(arm, "T>1")].rate(1)
    assert learnt < 0.3
    second = fresh()
    assert second._engine_rates(arm, "T>1").rate(1) == pytest.approx(learnt, abs=1e-3)
    assert second._engine_rates(arm, "greedy").rate(1) == pytest.approx(PRIOR["text"])  # nothing kept for greedy
    assert second.probing.probe_after[(arm, "T>1")] == first.probing.probe_after[(arm, "T>1")] > PROBE_FIRST
    assert all(c is None for c in run(second, "b", hot, PROBE_FIRST)), "a fresh process re-learnt by drafting"
    (line,) = describe_learned(path)  # what `check` prints
    assert line.startswith("ngram/1 @ T>1: accepted by depth 0.") and "a losing probe waits" in line
    path.write_text("{not json")
    assert fresh()._engine_rates(arm, "T>1").rate(1) == pytest.approx(PRIOR["text"])


# -- the engine: identity with the target alone, whatever was chosen ------------------------------
def _engine(target, draft, text=(), combined=True, shape=None, betting=False, max_batch=1, eos=EOS):
    proposer = DraftProposer(CachedLM(draft), shape or TreeShape.chain(3)) if draft is not None else None
    setup = SpeculationSetup(tuple(text), combined, shape)
    return SpeculativeEngine(TargetVerifier(CachedLM(target)), proposer, [eos], betting=betting,
                             max_batch=max_batch, setup=setup)


SMALL_VOCAB = 16  # a random model over few tokens repeats itself: the text proposers find matches


def _repetitive_prompts():
    g = torch.Generator().manual_seed(3)
    base = torch.randint(3, SMALL_VOCAB, (12,), generator=g).tolist()
    return [base * 2, base[:5] + base + base[:7], torch.randint(3, SMALL_VOCAB, (9,), generator=g).tolist()]


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=21, vocab_size=SMALL_VOCAB)
    return target, perturbed(target, 0.05, seed=22)


@pytest.mark.parametrize("text,model,combined,shape", [
    (("ngram",), False, True, None),
    (("suffix",), False, True, None),
    (("ngram", "suffix"), False, True, None),  # merged trees
    (("ngram", "suffix"), True, False, None),  # auto: one of model, ngram, suffix or none per step
    (("ngram", "suffix"), True, True, TreeShape(8, 3, 2)),  # everything merged under a pinned tree
    ((), True, True, None),  # the model alone, its depth chosen per step
], ids=["ngram", "suffix", "ngram+suffix", "auto", "all-merged-pinned", "model-adaptive"])
@pytest.mark.parametrize("batch", [1, 3], ids=["alone", "batched"])
def test_greedy_identity_with_every_proposer(pair, text, model, combined, shape, batch, monkeypatch):
    target, draft = pair
    # this tiny draft costs what its target does: priced at that, a busy machine can keep it off for
    # every step, and then nothing here would test it; its cost is left out (its measured waits still count)
    monkeypatch.setattr(pricing, "draft_cost", lambda costs, arm, name, depth: 0.0)
    engine = _engine(target, draft if model else None, text, combined, shape, max_batch=batch)
    prompts = _repetitive_prompts()
    results = engine.generate_batch([Request(p, 40) for p in prompts])
    accepted, chosen = 0, set()
    for p, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(target, p, 40, eos=EOS)
        accepted += sum(result.stats.accepted_per_step)
        chosen |= set(result.stats.choices)
    assert accepted > 0, f"nothing was ever accepted ({chosen}): the proposers were not exercised"
    if not combined:
        assert len(chosen) >= 2, f"the cost model never switched: {chosen}"


@pytest.mark.parametrize("betting", [False, True], ids=["no-bets", "bets"])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8)], ids=["greedy", "sampled"])
def test_a_wide_model_tree_when_the_cost_model_picks_it(pair, betting, params, monkeypatch):
    """The model's width-2 arm made the likely winner (its acceptance high, the draft's cost
    ignored): its trees (two children per expanded node; sampled from q at T=0.8; cut by the
    draft's confidence) are chosen, verified and, greedy, still the target's own output."""
    target, draft = pair
    engine = _engine(target, draft, betting=betting)
    speculator = engine.speculator
    assert (("model",), 2) in speculator.arms
    for heat in HEATS:
        speculator.acceptance[((("model",), 1), heat)] = AcceptanceRates(6, [0.2] * 6, prior_weight=1e6)
        speculator.acceptance[((("model",), 2), heat)] = AcceptanceRates(6, [0.99] * 6, prior_weight=1e6)
    # this tiny draft costs what its target does: its cost left out
    monkeypatch.setattr(pricing, "draft_cost", lambda costs, arm, name, depth: 0.0)
    speculator.cut_offs = True  # trees cut by the draft's confidence (down to the root) stay exact
    chosen = set()
    for p in _repetitive_prompts():
        result = engine.generate(p, 30, params)
        chosen |= set(result.stats.choices)
        if params.greedy:
            assert result.token_ids == hf_greedy(target, p, 30, eos=EOS)
    assert any(c.startswith("model*2@") for c in chosen), chosen


@pytest.mark.parametrize("betting", [False, True], ids=["no-bets", "bets"])
def test_model_with_cost_model_and_bets_is_exact(pair, betting):
    target, draft = pair
    engine = _engine(target, draft, ("suffix",), combined=False, betting=betting)
    for p in _repetitive_prompts():
        result = engine.generate(p, 40)
        assert result.token_ids == hf_greedy(target, p, 40, eos=EOS)


# -- sampling stays exact with every proposer and with the cost model switching -----------------------
@pytest.mark.parametrize("text,model,combined,shape", [
    (("ngram",), False, True, TreeShape(6, 3, 2)), (("suffix",), False, True, TreeShape(6, 3, 2)),
    (("ngram", "suffix"), True, False, None)], ids=["ngram", "suffix", "auto-switching"])
def test_sampling_with_proposers_matches_target_distribution(text, model, combined, shape):
    """A repetitive prompt over 8 tokens, so the text proposers find matches and trees get
    verified (a pinned tree: every step that has a match speculates); the joint of the first 3
    sampled tokens must fit the target's exactly."""
    from test_sampling import N, PARAMS, VOCAB, chi_square_pvalue, exact_joint, sample_counts

    target = tiny_model("llama", seed=11, vocab_size=VOCAB, initializer_range=0.5, num_hidden_layers=1,
                        eos_token_id=None)
    draft = perturbed(target, 0.6, seed=12)
    engine = _engine(target, draft if model else None, text, combined, shape, eos=-1)
    prompt = [3, 7, 2, 3, 7, 2, 3, 7]
    counts = sample_counts(engine, SamplingParams(**PARAMS), N, prompt=prompt)
    assert chi_square_pvalue(counts, exact_joint(target, SamplingParams(**PARAMS), prompt=prompt), N) > 1e-3
    runs = [engine.generate(prompt, 3, SamplingParams(**PARAMS, seed=s)).stats for s in range(100)]
    assert sum(sum(r.accepted_per_step) for r in runs) > 0, "no draft token was ever accepted"


# -- through the actors: the speculator runs in the coordinator, the draft model in its actor --------
from test_actors import _concurrently, _live_requests, _save_pair  # noqa: E402


@pytest.mark.parametrize("text,combined,batch", [(("ngram", "suffix"), False, 1), (("suffix",), True, 3)],
                         ids=["auto-alone", "suffix-batched"])
def test_actors_identity_with_proposers_and_cost_model(ray_session, pair, tmp_path, text, combined, batch):
    from dovetail.config import EngineConfig

    target, draft = pair
    target_dir, draft_dir = _save_pair(tmp_path, target, draft)
    config = EngineConfig(target=str(target_dir), draft=str(draft_dir), sockets="0", draft_precision="fp32",
                          max_batch=batch)
    engine = actor_engine(target_dir, draft_dir, config, [EOS], setup=SpeculationSetup(text, combined, None))
    try:
        prompts = _repetitive_prompts()
        chosen, accepted = set(), 0
        for pipeline in (True, False):
            results = _concurrently(lambda i: engine.generate(prompts[i], 40, pipeline=pipeline), len(prompts))
            for i, p in enumerate(prompts):
                assert results[i].token_ids == hf_greedy(target, p, 40, eos=EOS), (i, pipeline)
                chosen |= set(results[i].stats.choices)
                accepted += sum(results[i].stats.accepted_per_step)
        assert accepted > 0 and len(chosen) >= 2, chosen
        assert set(_live_requests(engine).values()) == {0}
    finally:
        engine.shutdown()


def test_a_slowed_point_of_the_first_cost_curve_is_cut_down_to_a_larger_ones():
    """Noise from other processes only adds time: a 16-row forward timed above the 32-row one, or
    one tree above eight, is cut to the larger block's cost, so one spike cannot switch speculation off."""
    from dovetail.speculation.calibrate import monotone

    assert monotone({1: 0.080, 4: 0.117, 16: 1.320, 32: 0.410}) == {1: 0.080, 4: 0.117, 16: 0.410, 32: 0.410}
    assert monotone({1: 0.165, 2: 0.140, 4: 0.198, 8: 0.093}) == {1: 0.093, 2: 0.093, 4: 0.093, 8: 0.093}
    curve = {1: 0.08, 2: 0.09, 4: 0.1}
    assert monotone(curve) == curve
