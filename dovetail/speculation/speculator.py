"""The speculator: what the decode loop drafts with (``decode.TreeSource``). It keeps each
request's bookkeeping and the engine's learnt figures, runs the configured proposers, and asks
``pricing.price`` which of them grow each request's tree and how deep, or none at all.

Each step, per request:

1. The model-free proposers (``ngram``, ``suffix``) learn the new tokens and propose their
   deepest tree (microseconds).
2. ``pricing.price`` rates every option from what the speculator has learnt (acceptance by
   depth, the draft's measured waits, the verify curve) and picks; see its module for the rule.
   With ``cut_offs`` it also cuts a lone draft model's tree where its nodes stop paying
   (``pricing.with_cut_offs``). Off by default: it has not paid in measurement (see docs/design.md).
3. A model proposer grows its tree only when chosen. When it is not, it is not run at all: the
   tokens it missed are fed with its next proposal, in one forward, whose extra rows are priced
   into that proposal's cost (``_missed``, ``pricing.catch_up_s``).
4. The chosen trees are merged under one root; ``learn`` then feeds the cost model what the step
   cost and committed. A model-free option that was not verified is judged too, for free,
   against the tokens the step committed (``RequestState.shadow``): text that starts repeating
   is noticed at once instead of at the next probe.

Options that lose are tried again now and then (every 8 request-steps of the engine, doubling to
128 while they keep losing, and never more often than their expected loss fits 3% of the steps),
so a change in the text or the machine is noticed. Acceptance and that schedule are learnt per
temperature class (greedy, T <= 1, T > 1) and kept on disk beside the cost curve (``learned.py``),
so a fresh process starts where the last one left off. ``shape`` pins the tree (``--tree``): then
only the proposer is chosen, and never none.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

from dovetail.decode import Drafting, Proposal, StepTimes, Verdict
from dovetail.models.tree import DraftTree, TreeShape, merge_trees
from dovetail.speculation.cost import AcceptanceRates, Confidence, Ema, VerifyCurve, blended, expected_tokens
from dovetail.speculation.members import Member, propose_models, propose_text
from dovetail.speculation import learned
from dovetail.speculation.learned import Keeper
from dovetail.speculation.options import HEATS, MAX_DEPTH, MODEL_WIDTHS, PRIOR, RequestState, temperature_class
from dovetail.speculation.pricing import Ask, Costs, Lost, Probing, choice_of, price, text_tree

log = logging.getLogger("dovetail")


class Speculator:
    """Per-request bookkeeping and the engine's learnt figures around ``pricing.price``."""

    def __init__(self, members: list[Member], options: list[tuple[str, ...]], curve: VerifyCurve,
                 shape: TreeShape | None = None, say=None, cut_offs: bool = False, learned_at: Path | None = None):
        """``options``: the proposer combinations to choose from (each merged under one root);
        ``curve``: the target's measured verify cost; ``shape``: a pinned tree; ``cut_offs``: cut
        a draft model's trees by its confidence (``pricing.with_cut_offs``; the confidence is
        learnt either way); ``learned_at``: where earlier engines of this configuration kept what
        they learnt (``learned.py``), read now and written as this one learns."""
        self.members = {m.name: m for m in members}
        unknown = {n for key in options for n in key} - set(self.members)
        if unknown or not options:
            raise ValueError(f"options name unknown proposers {sorted(unknown)}" if unknown else "no options")
        self.options, self.curve, self.shape = [tuple(o) for o in options], curve, shape
        self.cut_offs = cut_offs
        self.say = say or log.info
        self.max_depth = shape.depth if shape is not None else MAX_DEPTH
        # arms: an option's proposers and, for a lone draft model, its width (each learns its acceptance)
        self.arms = [(key, width) for key in self.options for width in self._widths(key)]
        # engine-wide, by (arm, temperature class): a draft's acceptance at T = 1.5 is another matter
        # than greedy (a request's own figure is blended with the one that fits it); made on first use
        self.acceptance: dict[tuple[tuple, str], AcceptanceRates] = {}
        self.keeper, stored = Keeper(learned_at), learned.load(learned_at)
        self.stored = stored.get("acceptance", {})
        self.observed: set[tuple[tuple, str]] = set()  # the keys this engine has seen steps of
        names = {learned.key_name(arm, heat): (arm, heat) for arm in self.arms for heat in HEATS}
        # when losing arms are tried again (each step's pricing gives the next), from where earlier engines left it
        self.probing = Probing(probe_after={names[k]: n for k, n in stored.get("probe_after", {}).items()
                                            if k in names})
        self.draft_wait: dict[tuple[tuple, int], Ema] = {}  # (arm, depth) -> the loop's wait for the draft
        self.confidence: dict[tuple[tuple, bool], Confidence] = {}  # (arm, sampled) -> by draft probability
        self.states: dict[str, RequestState] = {}

    def _widths(self, key: tuple[str, ...]) -> tuple[int, ...]:
        lone_model = len(key) == 1 and not self.members[key[0]].free
        return MODEL_WIDTHS if lone_model and self.shape is None else (1,)

    def _engine_rates(self, arm: tuple, heat: str) -> AcceptanceRates:
        """The engine-wide figure of ``arm`` for a temperature class: what earlier engines stored,
        else the prior."""
        key = (arm, heat)
        if key not in self.acceptance:
            stored = self.stored.get(learned.key_name(arm, heat))
            self.acceptance[key] = (learned.restored(stored, self.max_depth) if stored
                                    else AcceptanceRates(self.max_depth, self._prior(arm)))
        return self.acceptance[key]

    def _prior(self, arm: tuple[tuple[str, ...], int]) -> float:
        key, width = arm
        if all(self.members[n].free for n in key):
            return PRIOR["text"]
        return PRIOR["wide"] if width > 1 else PRIOR["model"]

    # -- the loop's TreeSource protocol -----------------------------------------------------------
    def start(self, request_id: str, prompt_ids: list[int], params=None, tenant: str = "") -> None:
        self.states[request_id] = RequestState(len(prompt_ids), {n: [] for n in self.members},
                                               heat=temperature_class(params))
        for member in self.members.values():
            member.proposer.start(request_id, prompt_ids, params, tenant)

    def end(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        for member in self.members.values():
            member.proposer.end(request_id)
        if self.observed and self.keeper.due():
            self.keeper.save({k: v for k, v in self.acceptance.items() if k in self.observed},
                             {k: n for k, n in self.probing.probe_after.items() if k in self.observed})

    def propose(self, items: list[Drafting]) -> list[Proposal | Exception]:
        t0 = time.perf_counter()
        failed: dict[str, Exception] = {}
        for item in items:
            state = self.states[item.request_id]
            state.context += len(item.new_tokens)
            for pending in state.pending.values():
                pending.extend(int(t) for t in item.new_tokens)
        text_trees = propose_text(self.members, self.states, items, self.shape, failed)
        text_s = time.perf_counter() - t0
        asks = {i.request_id: self._ask(i.request_id, text_trees) for i in items if i.request_id not in failed}
        decision = price(list(asks.values()), self.arms, self._costs(), self.probing, text_s, self.shape,
                         self.cut_offs)
        self.probing, picks = decision.probing, decision.picks
        for rid, lost in decision.lost.items():
            self._say_off(rid, lost)
        grown = propose_models(self.members, self.states, items, picks, self.shape, failed)
        out: list[Proposal | Exception] = []
        for item in items:
            rid = item.request_id
            if rid in failed:
                self.states[rid].shadow = {}
                out.append(failed[rid])
                continue
            option = picks[rid]
            root = int(item.new_tokens[-1])
            trees = ([text_trees[(rid, n)].truncated(option.depth) for n in option.key if self.members[n].free]
                     + [grown[(rid, n)].tree for n in option.key if not self.members[n].free]) if option else []
            tree = merge_trees(trees) if trees else DraftTree([root], [-1])
            compute = text_s / len(items) + sum(grown[(rid, n)].compute_s for n in (option.key if option else ())
                                                if (rid, n) in grown)
            choice = choice_of(option, self.members, self.shape)
            self.states[rid].current = choice
            self.states[rid].shadow = {
                arm: text for arm in self.arms if arm != (option.arm if option else None)
                and all(self.members[n].free for n in arm[0])
                and len(text := text_tree(asks[rid].text, arm[0], self.members)) > 1}
            self.states[rid].catch_up_s = option.catch_up_s if option else 0.0
            out.append(Proposal(tree, compute, choice=choice, expected=option.tokens if option else 1.0))
        return out

    def bet(self, request_id: str, step: int) -> None:
        choice = self.states[request_id].current
        (name,) = choice.proposers
        self.members[name].proposer.bet(request_id, step, choice.shape)

    def collect_bet(self, request_id: str, step: int, outcome: Drafting) -> Proposal:
        """The betting member's bet, judged by it; a held bet's tree is next step's, so no
        ``propose`` will tell the others the outcome: they get it as pending tokens here."""
        state = self.states[request_id]
        choice = state.current
        (name,) = choice.proposers
        bet = self.members[name].proposer.collect_bet(request_id, step, outcome)
        if bet.held:
            state.context += len(outcome.new_tokens)
            for other, pending in state.pending.items():
                if other != name:
                    pending.extend(int(t) for t in outcome.new_tokens)
        expected = expected_tokens(self._rates(request_id, (choice.proposers, choice.width)), choice.shape.depth)
        return replace(bet, choice=choice, expected=expected)

    def learn(self, request_id: str, proposal: Proposal | None, verdict: Verdict, step: StepTimes) -> None:
        self.curve.observe(step.rows, step.context, step.verify_s)
        state = self.states.get(request_id)
        if state is None:
            return
        shadow, state.shadow = state.shadow, {}
        for arm, tree in shadow.items():
            self._observe(state, arm, *_matched(tree, verdict.tokens))
        if proposal is None or proposal.choice is None:
            return
        arm = (proposal.choice.proposers, proposal.choice.width)
        # The depth chosen, not the tree's: levels the cut-offs left out count as not accepted, so
        # the rates are what the choice yields (a tree cut to its root still cost a draft forward).
        depth = proposal.choice.shape.depth
        accepted = len(verdict.path) - 1
        if proposal.tree.scores is not None and len(arm[0]) == 1:
            confidence = self.confidence.setdefault((arm, state.heat), Confidence())
            on_path = set(verdict.path)
            for node in range(1, len(proposal.tree)):
                confidence.observe(math.exp(float(proposal.tree.scores[node])), node in on_path)
        if depth:
            self._observe(state, arm, depth, accepted)
        usual_wait = max(0.0, step.draft_wait_s - state.catch_up_s)  # the catch-up is priced apart
        self.draft_wait.setdefault((arm, proposal.choice.shape.depth), Ema()).add(usual_wait)

    def _observe(self, state: RequestState, arm: tuple, depth: int, accepted: int) -> None:
        self._engine_rates(arm, state.heat).observe(depth, accepted)
        self.observed.add((arm, state.heat))
        state.acceptance.setdefault(arm, AcceptanceRates(self.max_depth, 0.0, 0.0)).observe(depth, accepted)

    # -- what pricing reads ---------------------------------------------------------------------
    def _ask(self, request_id: str, text_trees: dict) -> Ask:
        """The request's part in this step's pricing, from its bookkeeping."""
        state = self.states[request_id]
        return Ask(request_id, state.context, {arm: self._rates(request_id, arm) for arm in self.arms},
                   {n: text_trees[(request_id, n)] for n, m in self.members.items() if m.free},
                   {n: self._missed(state, n) for n, m in self.members.items() if not m.free}, state.heat)

    def _costs(self) -> Costs:
        return Costs(self.curve, self.members, self.draft_wait, self.confidence)

    def _missed(self, state: RequestState, name: str) -> int:
        """The tokens model ``name`` feeds with its next tree beyond its usual (its catch-up, priced
        by ``pricing.catch_up_s``): those it missed when it was not run last step; none when it
        was, or is told every step (it then feeds only the committed tokens its tree did not hold)."""
        if self.members[name].every_step or (state.current is not None and name in state.current.proposers):
            return 0
        return len(state.pending[name])

    def _rates(self, request_id: str, arm: tuple) -> list[float]:
        state = self.states[request_id]
        own = state.acceptance.get(arm)
        prior = self._engine_rates(arm, state.heat)
        return blended(own, prior) if own is not None else prior.rates()

    def _say_off(self, request_id: str, lost: Lost) -> None:
        state = self.states[request_id]
        if state.off_said:
            return
        state.off_said = True
        self.say(f"request {request_id}: speculation off: the best draft, "
                 f"{choice_of(lost.option, self.members, self.shape)} (proposer@depth), is expected to give "
                 f"{lost.rate:.1f} tok/s against {lost.alone:.1f} for the target alone; the cost model tries "
                 f"again now and then")


def _matched(tree: DraftTree, committed: list[int]) -> tuple[int, int]:
    """How deep ``committed`` tells about ``tree`` (the tokens known below its root, up to its
    depth) and how many of them the tree's nodes follow from the root."""
    node, matched = 0, 0
    for token in committed:
        nxt = next((int(c) for c in tree.children(node) if int(tree.tokens[c]) == int(token)), None)
        if nxt is None:
            break
        node, matched = nxt, matched + 1
    return min(len(committed), int(tree.depths.max())), matched
