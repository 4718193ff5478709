"""Pricing a step: what each request drafts with (which proposers, how deep, how wide) or none,
from the acceptance rates, the draft's seconds and the target's verify curve.

A pure function: everything ``price`` reads comes in as arguments and nothing it is given is
changed, so a decision can be checked by hand. The speculator keeps what changes (the rates, the
measured waits, the probing schedule) and runs the proposers.

A step's rate is expected committed tokens over its seconds (draft wait + verification). "None"
(the target alone: one token per one-row forward) is always an option, and a draft is chosen only
when it is expected ``MARGIN`` faster, so a step is never expected to be slower than plain
decoding. A batch is rated as a whole: its rows share one verification, and a draft model grows
all its trees together.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from dovetail.decode import Choice
from dovetail.models.tree import DraftTree, TreeShape, merge_trees
from dovetail.speculation.cost import Confidence, Ema, VerifyCurve, expected_tokens
from dovetail.speculation.members import Member
from dovetail.speculation.options import (CATCH_UP_STEPS, GREEDY, MARGIN, MAX_DEPTH, PROBE_BUDGET, PROBE_FIRST, PROBE_LAST, TEXT_SHAPE,
                                         Option)

Arm = tuple[tuple[str, ...], int]  # proposers and a lone model's width: what acceptance is learnt for


@dataclass(frozen=True)
class Ask:
    """One request's part in a step: its context, its acceptance rates by arm (depth 1 first), the
    model-free proposers' trees, and per draft model the tokens its next first forward must feed
    (one row each) because it was not run last step (0 when it was, or is told every step)."""

    request_id: str
    context: int
    rates: Mapping[Arm, list[float]]
    text: Mapping[str, DraftTree] = field(default_factory=dict)
    missed: Mapping[str, int] = field(default_factory=dict)
    heat: str = GREEDY  # its temperature class (``options.temperature_class``): probing and confidence are kept apart


@dataclass(frozen=True)
class Costs:
    """What a step costs: the verify curve, the members (model-free or a model's seconds per
    level), the loop's measured wait by (arm, depth), and each model arm's confidence."""

    curve: VerifyCurve
    members: Mapping[str, Member]
    waits: Mapping[tuple[Arm, int], Ema] = field(default_factory=dict)
    confidence: Mapping[tuple[Arm, str], Confidence] = field(default_factory=dict)


@dataclass(frozen=True)
class Probing:
    """When losing arms are tried again, engine-wide by (arm, temperature class): request-steps since each
    was used, and after how many it is tried (a per-request schedule would re-probe every arm in
    every short request)."""

    losing: Mapping[tuple[Arm, str], int] = field(default_factory=dict)
    probe_after: Mapping[tuple[Arm, str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class Lost:
    """A request's best draft that was not worth its cost: it, its rate, the target alone's."""

    option: Option
    rate: float
    alone: float


@dataclass(frozen=True)
class Decision:
    """Each request's option (None: the target alone), the probing schedule after the step, and
    the requests whose best draft lost to the target alone."""

    picks: dict[str, Option | None]
    probing: Probing
    lost: dict[str, Lost]


def price(asks: Sequence[Ask], arms: Sequence[Arm], costs: Costs, probing: Probing = Probing(),
          text_s: float = 0.0, shape: TreeShape | None = None, cut_offs: bool = False) -> Decision:
    """Each request's option, rating the batch as a whole: requests are decided in turn, each
    against what the ones before it chose (the rest count as the target alone). A draft model
    shared by the batch may pay only when several requests use it, which no single request's turn
    can see: so the batch where every request takes its own best option is rated too, and wins
    when it is expected ``MARGIN`` faster. ``text_s``: the model-free proposers' time this step;
    ``shape``: a pinned tree (then only the proposers are chosen, never none)."""
    share = text_s / max(len(asks), 1)
    offered = {a.request_id: offer(a, arms, costs, share, shape) for a in asks}
    picks: dict[str, Option | None] = {rid: None for rid in offered}
    losing, probe_after = dict(probing.losing), dict(probing.probe_after)
    lost: dict[str, Lost] = {}
    for ask in asks:
        rid, options = ask.request_id, offered[ask.request_id]

        def rate(o: Option | None) -> float:
            return batch_rate(asks, {**picks, rid: o}, costs)

        best = max(options, key=rate, default=None)
        loser = None
        if shape is None and best is not None and rate(best) <= MARGIN * rate(None):
            loser, best = best, None
        best = _probe(losing, probe_after, arms, ask.heat, best, options, costs.curve, ask.context)
        if best is None and loser is not None:
            lost[rid] = Lost(loser, rate(loser), rate(None))
        picks[rid] = best
    if len(asks) > 1 and shape is None:
        together = {a.request_id: _best_alone(a, offered[a.request_id], costs) for a in asks}
        if batch_rate(asks, together, costs) > MARGIN * batch_rate(asks, picks, costs):
            picks = together
    if shape is None and cut_offs:
        picks = with_cut_offs(asks, picks, costs)
    return Decision(picks, Probing(losing, probe_after), lost)


def offer(ask: Ask, arms: Sequence[Arm], costs: Costs, text_s: float = 0.0,
          shape: TreeShape | None = None) -> list[Option]:
    """The request's options: every arm at every depth worth rating (a text arm as deep as its
    tree; ``shape``'s depth when pinned), with expected tokens, rows and draft seconds."""
    members, out = costs.members, []
    for key, width in arms:
        rates = ask.rates[(key, width)]
        free = [n for n in key if members[n].free]
        models = [n for n in key if not members[n].free]
        text = text_tree(ask.text, key, members)
        if text is not None and len(text) == 1 and not models:
            continue  # nothing to propose this step
        depths = ([shape.depth] if shape is not None else
                  range(1, (MAX_DEPTH if models else int(text.depths.max())) + 1))
        for depth in depths:
            text_rows = len(text.truncated(depth)) - 1 if text is not None else 0
            model_rows = (shape.total_tokens - 1 if shape is not None else width * depth) if models else 0
            free_s = text_s if free else 0.0
            catch_up = sum(catch_up_s(members[n], ask.missed.get(n, 0)) for n in models)
            draft_s = free_s + catch_up / CATCH_UP_STEPS + sum(draft_cost(costs, (key, width), n, depth) for n in models)
            out.append(Option(key, depth, 1 + text_rows + model_rows, expected_tokens(rates, depth), draft_s,
                              free_s, catch_up, text, width))
    return out


def batch_rate(asks: Sequence[Ask], picks: Mapping[str, Option | None], costs: Costs) -> float:
    """Expected committed tokens per second of one step of ``asks`` with these options (None: the
    target alone). One request: its option's own draft wait. Several: the model-free proposers'
    times add up; a model grows all its trees together, one forward a level whose rows are the
    trees still growing (``Member.level_s``)."""
    chosen = [picks.get(a.request_id) for a in asks]
    rows = sum(o.rows if o else 1 for o in chosen)
    tokens = sum(o.tokens if o else 1.0 for o in chosen)
    context = max(a.context for a in asks)
    if len(asks) == 1:
        draft = chosen[0].draft_s if chosen[0] else 0.0
    else:
        draft = sum(o.free_s + o.catch_up_s / CATCH_UP_STEPS for o in chosen if o) + sum(
            batch_draft_s(member, [(o.depth, o.width) for o in chosen if o and name in o.models(costs.members)])
            for name, member in costs.members.items() if not member.free)
    return tokens / (costs.curve.at(rows, context) + draft)


def batch_draft_s(member: Member, trees: list[tuple[int, int]]) -> float:
    """A model's time for trees of these (depth, width) grown together (lockstep, one forward a
    level over the nodes each tree still expands)."""
    return sum(member.level_s(sum(w for d, w in trees if d > level))
               for level in range(max((d for d, _ in trees), default=0)))


def draft_cost(costs: Costs, arm: Arm, name: str, depth: int) -> float:
    """What the loop waits for a model's tree of ``depth`` levels: measured when seen, else its
    calibrated forward time per level (a level of a wide tree expands ``width`` nodes)."""
    seen = costs.waits.get((arm, depth))
    if seen is not None and seen.weight >= 1.0:
        return seen.value
    return depth * costs.members[name].level_s(arm[1])


def catch_up_s(member: Member, missed: int) -> float:
    """What a model's next tree costs beyond its usual wait when its first forward feeds ``missed``
    tokens (one row each) instead of the last one (an option prices it over ``CATCH_UP_STEPS``)."""
    return max(0.0, member.level_s(missed) - member.level_s(1)) if missed > 1 else 0.0


def text_tree(trees: Mapping[str, DraftTree], key: tuple[str, ...], members: Mapping[str, Member]) -> DraftTree | None:
    """The model-free proposers' trees of ``key`` merged (None: it names none)."""
    free = [trees[n] for n in key if members[n].free]
    return merge_trees(free) if free else None


def with_cut_offs(asks: Sequence[Ask], picks: dict[str, Option | None], costs: Costs) -> dict[str, Option | None]:
    """Each lone model's tree cut where its nodes stop paying. At the step's expected rate r, a
    node costs r x (a verified row) tokens to keep and r x (a row + a draft level) to expand;
    the cut-offs are the draft probabilities from which on nodes are seen to commit that much
    (``Confidence.lowest``). Not for a probe (which is how the buckets under a cut-off are seen
    again), nor before anything is seen (the whole tree)."""
    if not asks:
        return picks
    rate = batch_rate(asks, picks, costs)
    rows = sum(o.rows if o else 1 for o in picks.values())
    context = max(a.context for a in asks)
    row_s = max(costs.curve.at(rows + 1, context) - costs.curve.at(rows, context), 0.0)
    out = dict(picks)
    for ask in asks:
        option = picks.get(ask.request_id)
        if option is None or option.probe or len(option.key) != 1 or costs.members[option.key[0]].free:
            continue
        confidence = costs.confidence.get((option.arm, ask.heat))
        if confidence is None:
            continue
        level_s = costs.members[option.key[0]].level_s(1)
        cuts = (confidence.lowest(rate * row_s), confidence.lowest(rate * (row_s + level_s)))
        out[ask.request_id] = replace(option, cut_offs=cuts)
    return out


def choice_of(option: Option | None, members: Mapping[str, Member], shape: TreeShape | None = None) -> Choice | None:
    """The loop's ``Choice`` for an option: its proposers and tree shape (``shape`` when pinned)."""
    if option is None:
        return None
    if shape is None and option.models(members) and len(option.key) == 1:
        shape = option.model_shape()
    elif shape is None:
        shape = TreeShape(max(option.rows, 2), option.depth, 1 if option.rows == option.depth + 1 else TEXT_SHAPE.top_k)
    bets = len(option.key) == 1 and members[option.key[0]].bets
    return Choice(option.key, shape, bets, option.width)


def _best_alone(ask: Ask, options: list[Option], costs: Costs) -> Option | None:
    """The request's best draft were it alone (even one that loses alone: shared, it may pay)."""
    return max(options, key=lambda o: batch_rate([ask], {ask.request_id: o}, costs), default=None)


def _probe(losing: dict, probe_after: dict, arms: Sequence[Arm], heat: str, best: Option | None,
           options: list[Option], curve: VerifyCurve, context: int) -> Option | None:
    """Now and then, an arm that keeps losing is tried anyway (its cheapest depth per row), so its
    acceptance and cost stay current. Counts request-steps in ``losing`` and ``probe_after`` (the
    caller's copies), apart by temperature class. A probe is due after ``probe_after`` steps, and
    never before its expected loss fits ``PROBE_BUDGET`` of the steps since the last one (shared
    by every losing arm): a draft that costs half the target waits longer than a free one."""
    chosen = best.arm if best else None
    for arm in arms:
        key = (arm, heat)
        if arm == chosen:
            losing[key], probe_after[key] = 0, PROBE_FIRST
            continue
        losing[key] = losing.get(key, 0) + 1
        if losing[key] >= probe_after.setdefault(key, PROBE_FIRST):
            candidates = [o for o in options if o.arm == arm]
            if not candidates:
                continue
            probe = max(candidates, key=lambda o: o.tokens / max(o.rows, 1))
            one_row = curve.at(1, context)
            loss = (probe.draft_s + curve.at(probe.rows, context)) / one_row - probe.tokens  # in one-row steps
            if losing[key] * PROBE_BUDGET < loss * max(len(arms) - 1, 1):
                continue
            losing[key] = 0
            probe_after[key] = min(2 * probe_after[key], PROBE_LAST)
            return replace(probe, probe=True)
    return best
