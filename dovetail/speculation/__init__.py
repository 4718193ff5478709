"""Speculation: which proposers draft, and the cost model that picks among them every step.

    lookup.py      proposers without a model: ``ngram`` (prompt lookup), ``suffix`` (suffix decoding)
    cost.py        the verify cost curve, acceptance by depth, expected tokens per step
    calibrate.py   the curve and the draft's cost per level, measured once per machine and cached
    learned.py     what the cost model learnt (acceptance, probing), kept beside the curve for the next process
    options.py     what pricing rates and the speculator keeps: options, request state, depth and width bounds
    members.py     a proposer the speculator runs, and running them for a step
    pricing.py     the choice of each step, a pure function of the options, the curve and the rates
    speculator.py  what the decode loop drafts with: bookkeeping, runs the members, asks pricing, learns

``--draft`` names the proposers: ``auto`` (the default: the draft model ``auto`` resolves to, plus
``ngram`` and ``suffix``, the cost model choosing one of them, or none, every step), one name, or
several joined by ``+`` (their trees merged every step, e.g. ``ngram+suffix``). ``model`` and
``dovetail`` stand for the draft model and the feature drafter; any other name is a draft model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dovetail.errors import UserError
from dovetail.store import AUTO_DRAFT

TEXT_PROPOSERS = ("ngram", "suffix")


@dataclass(frozen=True)
class Proposers:
    """``--draft``, parsed: the draft model (a spec for ``dovetail.store.resolve_draft``, or
    None), the model-free proposers, and whether their trees merge every step (``combined``) or
    the cost model picks one of them per step."""

    model: str | None
    text: tuple[str, ...] = ()
    combined: bool = True

    @property
    def names(self) -> list[str]:
        return (["model"] if self.model is not None else []) + list(self.text)

    @property
    def any(self) -> bool:
        return self.model is not None or bool(self.text)


def parse_proposers(spec: str | None) -> Proposers:
    """``None`` (speculation off), ``auto``, a name, or names joined by ``+``."""
    if spec is None:
        return Proposers(None)
    if spec == AUTO_DRAFT:  # the draft model "auto" resolves to, and both model-free proposers
        return Proposers(AUTO_DRAFT, TEXT_PROPOSERS, combined=False)
    parts = [p.strip() for p in spec.split("+")]
    if any(not p for p in parts):
        raise UserError(f"bad --draft {spec!r}: names joined by '+', e.g. ngram+suffix")
    text = tuple(p for p in parts if p in TEXT_PROPOSERS)
    models = [(AUTO_DRAFT if p == "model" else p) for p in parts if p not in TEXT_PROPOSERS]
    if len(models) > 1:
        raise UserError(f"bad --draft {spec!r}: at most one draft model, got {models}")
    if len(set(text)) != len(text):
        raise UserError(f"bad --draft {spec!r}: a proposer is named twice")
    return Proposers(models[0] if models else None, text)


@dataclass
class SpeculationSetup:
    """How an engine speculates, besides its draft model: the model-free proposers, whether
    trees merge (``combined``), a pinned tree (None: the cost model picks), the cache key of the
    cost curve (None: measure, do not cache), where to say things, the suffix cache shared by
    the engine's requests, and whether the cost model cuts a draft model's trees by the draft's
    confidence (``cut_offs``: off by default, as it has not paid in measurement; see docs/design.md)."""

    text: tuple[str, ...] = ()
    combined: bool = True
    shape: object = None
    cost_key: dict | None = None
    say: object = None
    suffix_cache: object = field(default=None, repr=False)
    cut_offs: bool = False


def build_speculator(model, setup: SpeculationSetup, verifier, context_length: int,
                     reads_features: bool = False, bets: bool = False):
    """The loop's speculator over ``model`` (a ``Proposer`` over the draft model, or None) and the
    model-free proposers ``setup.text``; None when there is nothing to propose with. A draft that
    ``reads_features`` (the Dovetail drafter, named ``dovetail``) is told every step; the draft
    model (``model``) only when chosen. The cost curve is measured through ``verifier`` (and a
    draft model) when the cost model has a choice."""
    from dovetail.models.tree import TreeShape
    from dovetail.speculation.calibrate import measured_costs
    from dovetail.speculation.cost import VerifyCurve
    from dovetail.speculation.learned import learned_path
    from dovetail.speculation.lookup import NgramProposer, SuffixCache, SuffixProposer
    from dovetail.speculation.members import Member
    from dovetail.speculation.speculator import Speculator

    members = []
    if model is not None:
        members.append(Member("dovetail" if reads_features else "model", model, every_step=reads_features,
                              bets=bets))
    for name in setup.text:
        if name == "ngram":
            proposer = NgramProposer()
        else:
            setup.suffix_cache = setup.suffix_cache or SuffixCache()
            proposer = SuffixProposer(setup.suffix_cache)
        members.append(Member(name, proposer, free=True))
    if not members:
        return None
    options = [tuple(m.name for m in members)] if setup.combined else [(m.name,) for m in members]
    shape = setup.shape
    if shape is not None and len(options) == 1:  # nothing to choose: no curve to measure
        curve = VerifyCurve({1: 1.0})
    else:
        costs = measured_costs(verifier, model if model is not None and not reads_features else None,
                               context_length, setup.cost_key, setup.say or (lambda msg: None))
        curve = VerifyCurve(costs["verify"])
        if model is not None:
            levels = costs["draft_level_s"]
            if levels:
                members[0].step_s, members[0].levels = levels[1], VerifyCurve(levels)
    if shape is not None and not isinstance(shape, TreeShape):
        raise TypeError(f"shape must be a TreeShape, got {shape!r}")
    learned_at = learned_path(setup.cost_key) if shape is None or len(options) > 1 else None
    return Speculator(members, options, curve, shape, say=setup.say, cut_offs=setup.cut_offs, learned_at=learned_at)


def tree_room(proposers: Proposers, shape) -> int:
    """The most nodes one step's tree can have (KV admission counts them)."""
    from dovetail.speculation.options import MAX_DEPTH, MODEL_WIDTHS, TEXT_SHAPE

    if shape is not None:
        return shape.total_tokens * max(len(proposers.names), 1)
    model = MAX_DEPTH * max(MODEL_WIDTHS) * (proposers.model is not None)
    return model + (TEXT_SHAPE.total_tokens - 1) * len(proposers.text) + 1


def stats_depth(shape) -> int:
    """How many positions ``acceptance_by_position`` reports."""
    from dovetail.speculation.options import MAX_DEPTH

    return shape.depth if shape is not None else MAX_DEPTH
