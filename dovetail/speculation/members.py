"""The speculator's members: a proposer it runs, and running them for a step. The model-free ones
propose every step (they learn every token); a model grows a tree only when chosen, and is told
the tokens it missed with its next tree, unless it must be told every step."""

from __future__ import annotations

from dataclasses import dataclass

from dovetail.decode import Drafting, Proposal, Proposer
from dovetail.models.tree import DraftTree, TreeShape
from dovetail.speculation.cost import VerifyCurve
from dovetail.speculation.options import TEXT_SHAPE, RequestState


@dataclass
class Member:
    """A proposer the speculator runs. ``free``: model-free, told every step, its drafting costs
    ~nothing; ``every_step``: must be told every step even when not chosen (a feature drafter
    needs the target's features of each step); ``bets``: can draft the next tree during
    verification (a model on its own cores or GPU)."""

    name: str
    proposer: Proposer
    free: bool = False
    every_step: bool = False
    bets: bool = False
    step_s: float = 0.0  # a model's measured seconds per tree level (its draft forward)
    levels: VerifyCurve | None = None  # seconds per level by trees grown together (calibrated)

    def level_s(self, trees: int) -> float:
        """Seconds of one tree level grown for ``trees`` requests together (one forward)."""
        if trees < 1:
            return 0.0
        return self.levels.base_at(trees) if self.levels is not None else trees * self.step_s


def take(state: RequestState, name: str) -> list[int]:
    """The tokens member ``name`` has not been told yet (it is told them now)."""
    tokens, state.pending[name] = state.pending[name], []
    return tokens


def propose_text(members: dict[str, Member], states: dict[str, RequestState], items: list[Drafting],
                 shape: TreeShape | None, failed: dict) -> dict[tuple[str, str], DraftTree]:
    """Every model-free proposer's deepest tree for every request (it also learns the tokens)."""
    trees = {}
    for member in members.values():
        if not member.free:
            continue
        asks = [Drafting(i.request_id, i.step, take(states[i.request_id], member.name), None,
                         shape or TEXT_SHAPE) for i in items]
        for item, proposal in zip(items, member.proposer.propose(asks)):
            if isinstance(proposal, Exception):
                failed[item.request_id] = proposal
            else:
                trees[(item.request_id, member.name)] = proposal.tree
    return trees


def propose_models(members: dict[str, Member], states: dict[str, RequestState], items: list[Drafting],
                   picks: dict, shape: TreeShape | None, failed: dict) -> dict[tuple[str, str], Proposal]:
    """Model proposers grow the trees chosen for them (a batch's together; ``shape`` when pinned);
    one that must be told every step is told when not chosen; one that is not chosen keeps its
    tokens pending."""
    grown: dict[tuple[str, str], Proposal] = {}
    for member in members.values():
        if member.free:
            continue
        asks = []
        for item in items:
            option = picks.get(item.request_id)
            chosen = option is not None and member.name in option.key
            if item.request_id in failed or not (chosen or member.every_step):
                continue
            tree_shape = (shape or option.model_shape()) if chosen else None
            asks.append(Drafting(item.request_id, item.step, take(states[item.request_id], member.name),
                                 item.features, tree_shape))
        if not asks:
            continue
        for ask, proposal in zip(asks, member.proposer.propose(asks)):
            if isinstance(proposal, Exception):
                failed[ask.request_id] = proposal
            else:
                grown[(ask.request_id, member.name)] = proposal
    return grown
