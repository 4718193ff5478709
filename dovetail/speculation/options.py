"""What pricing rates and the speculator keeps: the options chosen among each step, each request's
state, and the constants that bound both (depths, tree widths, priors, the margin a draft must win
by, the probing schedule)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dovetail.decode import Choice
from dovetail.models.tree import DraftTree, TreeShape
from dovetail.speculation.cost import AcceptanceRates

MAX_DEPTH = 6  # the deepest chain the cost model considers
TEXT_SHAPE = TreeShape(total_tokens=3 * MAX_DEPTH + 1, depth=MAX_DEPTH, top_k=3)  # what text proposers offer
PROBE_FIRST, PROBE_LAST = 8, 128  # steps before a losing option is tried again (doubling)
PROBE_BUDGET = 0.03  # the share of the steps' time that probing losing options may cost, all of them together
MODEL_WIDTHS = (1, 2)  # a lone draft model's tree: a chain, or two children under each expanded node
PRIOR = {"model": 0.7, "wide": 0.8, "text": 0.5}  # acceptance before anything is seen (optimistic: it gets tried)
GREEDY = "greedy"  # the temperature class of greedy requests (``temperature_class``)
# A skipped model's catch-up (feeding the tokens it missed) is paid once and lets it draft the
# steps after it: an option prices it over this many steps. Priced whole into one step, it grows
# with every step the model sits out, so a model that lost a few steps to the text proposers
# would never be chosen again however well it drafts.
CATCH_UP_STEPS = 8
MARGIN = 1.05  # a draft must be expected this much faster than the target alone: estimates err both ways,
# and a draft chosen on a near tie loses about as often as it wins


@dataclass
class RequestState:
    context: int
    pending: dict[str, list[int]]  # tokens a skipped model has not been told yet
    acceptance: dict[tuple, AcceptanceRates] = field(default_factory=dict)  # by arm (see Speculator.arms)
    heat: str = GREEDY  # its temperature class: acceptance, probing and confidence are learnt apart by it
    current: Choice | None = None
    catch_up_s: float = 0.0  # the current choice's predicted catch-up (not part of a draft's usual wait)
    off_said: bool = False
    # model-free arms proposed but not verified this step, with their trees: ``learn`` scores each
    # against the committed tokens (greedy: exactly what verifying it would have accepted, as far
    # as those tokens reach; sampled: the same chance at depth 1, as a fixed candidate set is accepted
    # with the target's probability of it)
    shadow: dict[tuple, DraftTree] = field(default_factory=dict)


def temperature_class(params) -> str:
    """What the engine learns acceptance apart by: greedy requests; sampled ones at T <= 1 and
    hotter ones (a draft that pays at T = 0.8 can lose at T = 1.5, where the target's distribution
    is flatter); and, sampled, whether the draft samples its trees or proposes its most likely
    tokens (a request with a seed of its own)."""
    if params is None or params.greedy:
        return GREEDY
    heat = "T>1" if params.temperature > 1.0 else "T<=1"
    return heat if params.draft_samples else f"{heat} seeded"


HEATS = (GREEDY, "T<=1", "T>1", "T<=1 seeded", "T>1 seeded")  # every class ``temperature_class`` gives


@dataclass
class Option:
    """One way to draft a step, rated: ``tokens`` expected over ``seconds`` of draft + verify."""

    key: tuple[str, ...]
    depth: int
    rows: int
    tokens: float
    draft_s: float  # alone: the model-free proposers' time + the models' (measured wait, else calibrated)
    free_s: float = 0.0  # the model-free part of draft_s
    catch_up_s: float = 0.0  # feeding the tokens a skipped model missed (draft_s holds 1 / CATCH_UP_STEPS of it)
    tree: DraftTree | None = None  # a text option's tree, already grown
    width: int = 1  # a model's children per expanded node (its node budget: width x depth)
    cut_offs: tuple[float, float] = (0.0, 0.0)  # a lone model's (p_keep, p_grow), see TreeShape
    probe: bool = False  # chosen to refresh what is known of it, not for its rate

    @property
    def arm(self) -> tuple[tuple[str, ...], int]:
        """What acceptance is learnt for: the proposers and the model's width."""
        return self.key, self.width

    def models(self, members: dict) -> list[str]:
        return [n for n in self.key if not members[n].free]

    def model_shape(self) -> TreeShape:
        return TreeShape(self.width * self.depth + 1, self.depth, self.width, *self.cut_offs)
