"""The speculator: the one proposer the decode loop sees. It runs the configured proposers and
picks, for each request and step, which of them grow the tree and how deep, or none at all.

Each step, per request:

1. The model-free proposers (``ngram``, ``suffix``) learn the new tokens and propose their
   deepest tree (microseconds).
2. The cost model rates every option: expected committed tokens (its acceptance by depth) over
   the step's cost (the draft's measured wait + the target's verify curve at the tree's rows and
   this context). "None" (the target alone) is always an option, and a draft is chosen only when
   it is expected to be ``MARGIN`` faster, so a step is never expected to be slower than plain
   decoding. A batch is rated as a whole (its rows share one forward).
3. With ``cut_offs``, a lone draft model's tree is cut where its nodes stop paying: a node is
   kept (and expanded) only if the draft's cumulative probability of it is one at which nodes are
   seen to commit at least what a verified row (and a draft level) costs at the step's rate
   (``_with_cut_offs``). Off by default: it has not paid in measurement (see docs/design.md).
4. A model proposer grows its tree only when chosen. When it is not, it is not run at all: the
   tokens it missed are fed with its next proposal, in one forward, whose extra rows are priced
   into that proposal's cost (``_catch_up_s``).
5. The chosen trees are merged under one root; ``learn`` then feeds the cost model what the step
   cost and committed. A model-free option that was not verified is judged too, for free,
   against the tokens the step committed (``RequestState.shadow``): text that starts repeating
   is noticed at once instead of at the next probe.

Options that lose are tried again now and then (every 8 request-steps of the engine, doubling to
128 while they keep losing), so a change in the text or the machine is noticed. ``shape`` pins the tree (``--tree``):
then only the proposer is chosen, and never none.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

from dovetail.decode import Choice, Drafting, Proposal, StepTimes, Verdict
from dovetail.models.tree import DraftTree, TreeShape, merge_trees
from dovetail.speculation.cost import Acceptance, Confidence, Ema, VerifyCurve, blended, expected_tokens
from dovetail.speculation.members import Member, propose_models, propose_text
from dovetail.speculation.options import (MARGIN, MAX_DEPTH, MODEL_WIDTHS, PRIOR, PROBE_FIRST, PROBE_LAST, TEXT_SHAPE,
                                          Option, RequestState)

log = logging.getLogger("dovetail")


class Speculator:
    def __init__(self, members: list[Member], options: list[tuple[str, ...]], curve: VerifyCurve,
                 shape: TreeShape | None = None, say=None, cut_offs: bool = False):
        """``options``: the proposer combinations to choose from (each merged under one root);
        ``curve``: the target's measured verify cost; ``shape``: a pinned tree; ``cut_offs``: cut
        a draft model's trees by its confidence (``_with_cut_offs``; the confidence is learnt
        either way)."""
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
        # engine-wide, by (arm, sampled): a draft's acceptance when the request samples is another
        # matter than when it is greedy (a request's own figure is blended with the one that fits it)
        self.acceptance = {(arm, sampled): Acceptance(self.max_depth, self._prior(arm))
                           for arm in self.arms for sampled in (False, True)}
        # probing, engine-wide by (arm, sampled): request-steps since the arm was used, and after how many
        # it is tried again (a per-request schedule would re-probe every arm in every short request)
        self.losing: dict[tuple, int] = {}
        self.probe_after: dict[tuple, int] = {}
        self.draft_wait: dict[tuple[tuple, int], Ema] = {}  # (arm, depth) -> the loop's wait for the draft
        self.confidence: dict[tuple[tuple, bool], Confidence] = {}  # (arm, sampled) -> by draft probability
        self.states: dict[str, RequestState] = {}

    def _widths(self, key: tuple[str, ...]) -> tuple[int, ...]:
        lone_model = len(key) == 1 and not self.members[key[0]].free
        return MODEL_WIDTHS if lone_model and self.shape is None else (1,)

    def _prior(self, arm: tuple[tuple[str, ...], int]) -> float:
        key, width = arm
        if all(self.members[n].free for n in key):
            return PRIOR["text"]
        return PRIOR["wide"] if width > 1 else PRIOR["model"]

    # -- the Speculator protocol ---------------------------------------------------------------
    def start(self, request_id: str, prompt_ids: list[int], tenant: str = "", params=None) -> None:
        self.states[request_id] = RequestState(len(prompt_ids), {n: [] for n in self.members},
                                               sampled=params is not None and params.draft_samples)
        for member in self.members.values():
            if member.free:
                member.proposer.start(request_id, prompt_ids, tenant)
            else:
                member.proposer.start(request_id, prompt_ids, params)

    def end(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        for member in self.members.values():
            member.proposer.end(request_id)

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
        picks = self._choose([i for i in items if i.request_id not in failed], text_trees, text_s)
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
            choice = self._choice(option)
            self.states[rid].current = choice
            self.states[rid].shadow = {
                arm: text for arm in self.arms if arm != (option.arm if option else None)
                and all(self.members[n].free for n in arm[0])
                and len(text := self._text_tree(rid, arm[0], text_trees)) > 1}
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
            confidence = self.confidence.setdefault((arm, state.sampled), Confidence())
            on_path = set(verdict.path)
            for node in range(1, len(proposal.tree)):
                confidence.observe(math.exp(float(proposal.tree.scores[node])), node in on_path)
        if depth:
            self._observe(state, arm, depth, accepted)
        usual_wait = max(0.0, step.draft_wait_s - state.catch_up_s)  # the catch-up is priced apart
        self.draft_wait.setdefault((arm, proposal.choice.shape.depth), Ema()).add(usual_wait)

    def _observe(self, state: RequestState, arm: tuple, depth: int, accepted: int) -> None:
        self.acceptance[(arm, state.sampled)].observe(depth, accepted)
        state.acceptance.setdefault(arm, Acceptance(self.max_depth, 0.0, 0.0)).observe(depth, accepted)

    # -- choosing ------------------------------------------------------------------------------
    def _choose(self, items: list[Drafting], text_trees: dict, text_s: float) -> dict[str, Option | None]:
        """Each request's option, rating the batch as a whole (``_batch_rate``): requests are
        decided in turn, each against what the ones before it chose (the rest count as the target
        alone). A draft model shared by the batch may pay only when several requests use it, which
        no single request's turn can see: so the batch where every request takes its own best
        option is rated too, and wins when it is expected ``MARGIN`` faster."""
        share = text_s / max(len(items), 1)
        offered = {i.request_id: self._options(i.request_id, text_trees, share) for i in items}
        picks: dict[str, Option | None] = {rid: None for rid in offered}
        for item in items:
            rid, state = item.request_id, self.states[item.request_id]
            options = offered[rid]

            def rate(o: Option | None) -> float:
                return self._batch_rate(items, {**picks, rid: o})

            best = max(options, key=rate, default=None)
            if self.shape is None and best is not None and rate(best) <= MARGIN * rate(None):
                best = None
            best = self._maybe_probe(state, best, options)
            if best is None and options and self.shape is None:
                self._say_off(rid, state, options, rate)
            picks[rid] = best
        if len(items) > 1 and self.shape is None:
            together = {i.request_id: self._best_alone(i, offered[i.request_id]) for i in items}
            if self._batch_rate(items, together) > MARGIN * self._batch_rate(items, picks):
                picks = together
        return self._with_cut_offs(items, picks)

    def _with_cut_offs(self, items: list[Drafting], picks: dict[str, Option | None]) -> dict[str, Option | None]:
        """Each lone model's tree cut where its nodes stop paying. At the step's expected rate r, a
        node costs r x (a verified row) tokens to keep and r x (a row + a draft level) to expand;
        the cut-offs are the draft probabilities from which on nodes are seen to commit that much
        (``Confidence.lowest``). Not for a pinned shape, nor for a probe (which is how the buckets
        under a cut-off are seen again)."""
        if self.shape is not None or not self.cut_offs:
            return picks
        rate = self._batch_rate(items, picks)
        rows = sum(o.rows if o else 1 for o in picks.values())
        context = max((self.states[i.request_id].context for i in items), default=0)
        row_s = max(self.curve.at(rows + 1, context) - self.curve.at(rows, context), 0.0)
        out = dict(picks)
        for item in items:
            option = picks.get(item.request_id)
            if option is None or option.probe or len(option.key) != 1 or self.members[option.key[0]].free:
                continue
            confidence = self.confidence.get((option.arm, self.states[item.request_id].sampled))
            if confidence is None:
                continue  # nothing seen yet: the whole tree
            level_s = self.members[option.key[0]].level_s(1)
            cuts = (confidence.lowest(rate * row_s), confidence.lowest(rate * (row_s + level_s)))
            out[item.request_id] = replace(option, cut_offs=cuts)
        return out

    def _best_alone(self, item: Drafting, options: list[Option]) -> Option | None:
        """The request's best draft were it alone (even one that loses alone: shared, it may pay)."""
        return max(options, key=lambda o: self._batch_rate([item], {item.request_id: o}), default=None)

    def _batch_rate(self, items: list[Drafting], picks: dict[str, Option | None]) -> float:
        """Expected committed tokens per second of one step of ``items`` with these options (None:
        the target alone). One request: its option's own draft wait. Several: the model-free
        proposers' times add up; a model grows all its trees together, one forward a level whose
        rows are the trees still growing (``Member.level_s``)."""
        chosen = [picks.get(i.request_id) for i in items]
        rows = sum(o.rows if o else 1 for o in chosen)
        tokens = sum(o.tokens if o else 1.0 for o in chosen)
        context = max(self.states[i.request_id].context for i in items)
        if len(items) == 1:
            draft = chosen[0].draft_s if chosen[0] else 0.0
        else:
            draft = sum(o.free_s + o.catch_up_s for o in chosen if o) + sum(
                self._batch_draft_s(name, [(o.depth, o.width) for o in chosen if o and name in o.models(self.members)])
                for name, member in self.members.items() if not member.free)
        return tokens / (self.curve.at(rows, context) + draft)

    def _batch_draft_s(self, name: str, trees: list[tuple[int, int]]) -> float:
        """A model's time for trees of these (depth, width) grown together (lockstep, one forward a
        level over the nodes each tree still expands)."""
        member = self.members[name]
        return sum(member.level_s(sum(w for d, w in trees if d > level))
                   for level in range(max((d for d, _ in trees), default=0)))

    def _options(self, request_id: str, text_trees: dict, text_s: float) -> list[Option]:
        out = []
        catch_ups = {n: self._catch_up_s(request_id, n) for n, m in self.members.items() if not m.free}
        for key, width in self.arms:
            rates = self._rates(request_id, (key, width))
            free = [n for n in key if self.members[n].free]
            models = [n for n in key if not self.members[n].free]
            text = self._text_tree(request_id, key, text_trees)
            if text is not None and len(text) == 1 and not models:
                continue  # nothing to propose this step
            depths = ([self.shape.depth] if self.shape is not None else
                      range(1, (MAX_DEPTH if models else int(text.depths.max())) + 1))
            for depth in depths:
                text_rows = len(text.truncated(depth)) - 1 if text is not None else 0
                model_rows = (self.shape.total_tokens - 1 if self.shape is not None else width * depth) if models else 0
                free_s = text_s if free else 0.0
                catch_up = sum(catch_ups[n] for n in models)
                draft_s = free_s + catch_up + sum(self._draft_cost((key, width), n, depth) for n in models)
                out.append(Option(key, depth, 1 + text_rows + model_rows, expected_tokens(rates, depth), draft_s,
                                  free_s, catch_up, text, width))
        return out

    def _text_tree(self, request_id: str, key: tuple[str, ...], text_trees: dict) -> DraftTree | None:
        """The model-free proposers' trees of ``key`` merged (None: it names none)."""
        free = [text_trees[(request_id, n)] for n in key if self.members[n].free]
        return merge_trees(free) if free else None

    def _draft_cost(self, arm: tuple, name: str, depth: int) -> float:
        """What the loop waits for a model's tree of ``depth`` levels: measured when seen, else
        its calibrated forward time per level (a level of a wide tree expands ``width`` nodes)."""
        seen = self.draft_wait.get((arm, depth))
        if seen is not None and seen.weight >= 1.0:
            return seen.value
        return depth * self.members[name].level_s(arm[1])

    def _catch_up_s(self, request_id: str, name: str) -> float:
        """What a model's next tree costs beyond its usual wait because it was not run last step:
        its first forward then feeds every token it missed (one row each) instead of the last one.
        A model run last step feeds only the committed tokens its tree did not hold, as usual."""
        state = self.states[request_id]
        member = self.members[name]
        if member.every_step or (state.current is not None and name in state.current.proposers):
            return 0.0
        rows = len(state.pending[name])
        return max(0.0, member.level_s(rows) - member.level_s(1)) if rows > 1 else 0.0

    def _rates(self, request_id: str, arm: tuple) -> list[float]:
        state = self.states[request_id]
        own = state.acceptance.get(arm)
        prior = self.acceptance[(arm, state.sampled)]
        return blended(own, prior) if own is not None else prior.rates()

    def _maybe_probe(self, state: RequestState, best: Option | None, options: list[Option]) -> Option | None:
        """Now and then, an option that keeps losing is tried anyway (its best depth), so its
        acceptance and cost stay current. Counted in request-steps across the engine, apart for
        greedy and sampled requests."""
        chosen = best.arm if best else None
        for arm in self.arms:
            key = (arm, state.sampled)
            if arm == chosen:
                self.losing[key], self.probe_after[key] = 0, PROBE_FIRST
                continue
            self.losing[key] = self.losing.get(key, 0) + 1
            if self.losing[key] >= self.probe_after.setdefault(key, PROBE_FIRST):
                candidates = [o for o in options if o.arm == arm]
                if candidates:
                    self.losing[key] = 0
                    self.probe_after[key] = min(2 * self.probe_after[key], PROBE_LAST)
                    return replace(max(candidates, key=lambda o: o.tokens / max(o.rows, 1)), probe=True)
        return best

    def _say_off(self, request_id: str, state: RequestState, options: list[Option], rate) -> None:
        if state.off_said:
            return
        state.off_said = True
        best = max(options, key=rate)
        self.say(f"request {request_id}: speculation off: the best draft, {self._choice(best)} (proposer@depth), is "
                 f"expected to give {rate(best):.1f} tok/s against {rate(None):.1f} for the target alone; the cost "
                 f"model tries again now and then")

    def _choice(self, option: Option | None) -> Choice | None:
        if option is None:
            return None
        if self.shape is not None:
            shape = self.shape
        elif option.models(self.members) and len(option.key) == 1:
            shape = option.model_shape()
        else:
            shape = TreeShape(max(option.rows, 2), option.depth, 1 if option.rows == option.depth + 1 else TEXT_SHAPE.top_k)
        bets = len(option.key) == 1 and self.members[option.key[0]].bets
        return Choice(option.key, shape, bets, option.width)


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
