"""Pricing a step by hand: hand-made verify curves, acceptance rates and trees, where the right
choice follows from the arithmetic (expected tokens over draft + verify seconds, against one token
per one-row forward for the target alone)."""

import math

import pytest

from dovetail.models.tree import DraftTree, TreeShape
from dovetail.speculation.cost import Ema, VerifyCurve, expected_tokens
from dovetail.speculation.members import Member
from dovetail.speculation.options import CATCH_UP_STEPS, MARGIN, PROBE_BUDGET, PROBE_FIRST
from dovetail.speculation.pricing import Ask, Costs, Probing, batch_rate, choice_of, draft_cost, offer, price

NGRAM = (("ngram",), 1)
FLAT = {1: 0.040, 2: 0.041, 4: 0.043, 8: 0.050, 16: 0.070, 32: 0.110}


def chain(length: int, root: int = 4) -> DraftTree:
    """A text proposer's chain of ``length`` tokens after the root."""
    return DraftTree([root] + list(range(10, 10 + length)), list(range(-1, length)))


def text_costs(curve=FLAT, *names) -> Costs:
    return Costs(VerifyCurve(dict(curve)), {n: Member(n, None, free=True) for n in names or ("ngram",)})


def ngram_ask(rates, tree=None, rid="r") -> Ask:
    return Ask(rid, 10, {NGRAM: list(rates)}, {"ngram": tree if tree is not None else chain(6)})


def test_high_acceptance_and_a_free_draft_speculate_as_deep_as_the_arithmetic_says():
    costs, rates = text_costs(), [0.9] * 6
    decision = price([ngram_ask(rates)], [NGRAM], costs)
    by_depth = {k: expected_tokens(rates, k) / costs.curve.at(k + 1, 10) for k in range(1, 7)}
    best = max(by_depth, key=by_depth.get)
    assert 1 < best and by_depth[best] > MARGIN / costs.curve.at(1, 10)
    pick = decision.picks["r"]
    assert pick.key == ("ngram",) and pick.depth == best and not pick.probe
    assert decision.lost == {}


def test_zero_acceptance_leaves_the_target_alone_and_says_what_lost():
    costs = text_costs()
    decision = price([ngram_ask([0.0] * 6)], [NGRAM], costs)
    assert decision.picks == {"r": None}
    lost = decision.lost["r"]
    assert lost.option.depth == 1  # every depth commits one token; the shortest costs least
    assert lost.rate == pytest.approx(1 / costs.curve.at(2, 10))
    assert lost.alone == pytest.approx(1 / costs.curve.at(1, 10))


@pytest.mark.parametrize("share,speculates", [(0.8, False), (1.2, True)])
def test_a_draft_must_be_expected_margin_faster(share, speculates):
    """Rows cost nothing extra here: a depth-1 draft accepted with p gives 1 + p tokens a forward,
    so it wins only when p exceeds the margin."""
    costs = text_costs({1: 0.5, 2: 0.5})
    rate = (MARGIN - 1) * share
    decision = price([ngram_ask([rate] * 6, chain(1))], [NGRAM], costs)
    assert (decision.picks["r"] is not None) == speculates
    assert ("r" in decision.lost) != speculates


def test_a_pinned_shape_speculates_even_when_nothing_is_accepted():
    shape = TreeShape.chain(2)
    decision = price([ngram_ask([0.0] * 6)], [NGRAM], text_costs(), shape=shape)
    assert decision.picks["r"].depth == 2 and decision.lost == {}
    assert choice_of(decision.picks["r"], text_costs().members, shape).shape == shape


def test_a_root_alone_offers_nothing_and_still_counts_towards_a_probe():
    decision = price([ngram_ask([0.9] * 6, chain(0))], [NGRAM], text_costs())
    assert decision.picks == {"r": None} and decision.lost == {}  # nothing was offered: nothing lost
    assert decision.probing.losing[(NGRAM, "greedy")] == 1


def test_a_tie_goes_to_the_arm_offered_first():
    costs, suffix = text_costs(FLAT, "ngram", "suffix"), (("suffix",), 1)
    ask = Ask("r", 10, {NGRAM: [0.9] * 6, suffix: [0.9] * 6}, {"ngram": chain(3), "suffix": chain(3)})
    assert price([ask], [NGRAM, suffix], costs).picks["r"].key == ("ngram",)
    assert price([ask], [suffix, NGRAM], costs).picks["r"].key == ("suffix",)


@pytest.mark.parametrize("step_s,expected", [(0.001, ("model",)), (0.5, None)])
def test_a_draft_model_speculates_when_its_forwards_are_cheap(step_s, expected):
    model = (("model",), 1)
    costs = Costs(VerifyCurve(FLAT), {"model": Member("model", None, step_s=step_s)})
    decision = price([Ask("r", 10, {model: [0.95] * 6})], [model], costs)
    pick = decision.picks["r"]
    assert (pick.key if pick else None) == expected
    if pick:
        assert pick.draft_s == pytest.approx(pick.depth * step_s) and pick.rows == pick.depth + 1


def test_a_measured_wait_replaces_the_calibrated_draft_cost():
    model = (("model",), 1)
    members = {"model": Member("model", None, step_s=0.01)}
    assert draft_cost(Costs(VerifyCurve(FLAT), members), model, "model", 3) == pytest.approx(0.03)
    young = Costs(VerifyCurve(FLAT), members, {(model, 3): Ema(0.002, 0.5)})
    assert draft_cost(young, model, "model", 3) == pytest.approx(0.03)  # seen less than once: not yet
    seen = Costs(VerifyCurve(FLAT), members, {(model, 3): Ema(0.002, 1.0)})
    assert draft_cost(seen, model, "model", 3) == pytest.approx(0.002)


def test_a_skipped_models_missed_tokens_are_priced():
    model = (("model",), 1)
    member = Member("model", None, levels=VerifyCurve({1: 0.010, 2: 0.011, 4: 0.013, 8: 0.017}))
    costs = Costs(VerifyCurve(FLAT), {"model": member})
    (usual,) = offer(Ask("r", 10, {model: [0.9] * 6}), [model], costs, shape=TreeShape.chain(2))
    (late,) = offer(Ask("r", 10, {model: [0.9] * 6}, missed={"model": 8}), [model], costs, shape=TreeShape.chain(2))
    assert late.catch_up_s == pytest.approx(0.007)
    assert late.draft_s == pytest.approx(usual.draft_s + 0.007 / CATCH_UP_STEPS)  # paid once, serves the steps after


def test_a_losing_arm_is_probed_on_schedule_and_the_given_schedule_is_left_alone():
    due = Probing({(NGRAM, "greedy"): PROBE_FIRST - 1}, {(NGRAM, "greedy"): PROBE_FIRST})
    decision = price([ngram_ask([0.0] * 6)], [NGRAM], text_costs(), due)
    assert decision.picks["r"].probe and decision.lost == {}
    assert decision.probing.losing[(NGRAM, "greedy")] == 0
    assert decision.probing.probe_after[(NGRAM, "greedy")] == 2 * PROBE_FIRST
    assert due.losing == {(NGRAM, "greedy"): PROBE_FIRST - 1} and due.probe_after == {(NGRAM, "greedy"): PROBE_FIRST}
    sampled = price([Ask("r", 10, {NGRAM: [0.0] * 6}, {"ngram": chain(6)}, heat="T<=1")], [NGRAM], text_costs(), due)
    assert sampled.picks["r"] is None  # a sampled request keeps its own schedule


def test_the_same_inputs_give_the_same_decision():
    asks, costs = [ngram_ask([0.7] * 6, rid="a"), ngram_ask([0.1] * 6, rid="b")], text_costs()
    first, second = price(asks, [NGRAM], costs, text_s=0.001), price(asks, [NGRAM], costs, text_s=0.001)

    def seen(decision):
        return ({rid: o and (o.key, o.depth, o.rows, o.tokens, o.draft_s) for rid, o in decision.picks.items()},
                decision.probing, {rid: (lost.rate, lost.alone) for rid, lost in decision.lost.items()})

    assert seen(first) == seen(second) and first.picks["a"] is not None and first.lost.keys() == {"b"}
    assert costs.curve.seen == {}


def test_a_batch_shares_its_draft_model():
    """Four requests: a model level costs 8 ms for one tree and 10 ms for eight grown together, so
    it pays for the batch though no request's turn alone justifies delaying the other three;
    charged 8 ms a tree a level, it does not."""
    model = (("model",), 1)
    curve = {1: 0.040, 2: 0.041, 4: 0.043, 8: 0.046, 16: 0.052, 32: 0.070}
    asks = [Ask(rid, 10, {model: [0.95] * 6}) for rid in "abcd"]
    shared = Member("model", None, step_s=0.008, levels=VerifyCurve({1: 0.008, 2: 0.0085, 4: 0.009, 8: 0.010}))
    apart = Member("model", None, step_s=0.008)
    for member, expected in ((shared, ("model",)), (apart, None)):
        costs = Costs(VerifyCurve(curve), {"model": member})
        decision = price(asks, [model], costs)
        assert {p.key if p else None for p in decision.picks.values()} == {expected}
        assert batch_rate(asks, decision.picks, costs) >= batch_rate(asks, {}, costs)


def test_a_costly_probe_waits_until_its_loss_fits_the_budget():
    """A losing draft that costs half a target forward is not probed at the schedule's first due
    step: its expected loss (its draft and verify time, in one-row forwards, less its tokens) must
    fit PROBE_BUDGET of the steps since the last probe; a free proposer's probe goes on schedule."""
    model = (("model",), 1)
    costs = Costs(VerifyCurve(FLAT), {"model": Member("model", None, step_s=0.5 * FLAT[1])})
    ask = Ask("r", 10, {model: [0.0] * 6})
    loss = (0.5 * FLAT[1] + FLAT[2]) / FLAT[1] - 1.0  # a depth-1 probe, never accepted
    due = PROBE_FIRST
    assert due * PROBE_BUDGET < loss
    early = price([ask], [model], costs, Probing({(model, "greedy"): due - 1}, {(model, "greedy"): due}))
    assert early.picks["r"] is None and early.probing.losing[(model, "greedy")] == due
    affordable = math.ceil(loss / PROBE_BUDGET)
    late = price([ask], [model], costs, Probing({(model, "greedy"): affordable - 1}, {(model, "greedy"): due}))
    assert late.picks["r"].probe and late.picks["r"].depth == 1
    free = price([ngram_ask([0.0] * 6)], [NGRAM], text_costs(),
                 Probing({(NGRAM, "greedy"): due - 1}, {(NGRAM, "greedy"): due}))
    assert free.picks["r"].probe
