"""Resolving a model once: the ``ModelSpec`` (``models/spec.py``) the driver hands every process.

``store.py`` finds a model's folder; this decides how it runs (the precision, ``auto`` resolved),
where its weights load from (a GGUF folder's fp32 conversion made here, once, before any worker
starts), its EOS ids and its context.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from transformers import AutoConfig

from dovetail.models.loading import eos_token_ids_from_config
from dovetail.models.precision import resolve_precision
from dovetail.models.spec import FLOAT_DEFAULT, GGUF_DEFAULT, GGUF_PRECISIONS, ModelSpec
from dovetail.store import ModelStore, float_weights


def describe_model(folder: str | Path, precision: str = "auto", role: str = "target", tokenizer=None,
                   weights: bool = True, store: ModelStore | None = None) -> ModelSpec:
    """The ``ModelSpec`` of model folder ``folder`` (``resolve_model``'s result) at ``precision``
    for ``role``: the one place a precision is resolved. ``weights``: also make the float weights
    a non-native precision loads from (a GGUF folder's fp32 conversion, once); else ``weights``
    is the folder, for a description made before the slow part (``with_weights`` completes it)."""
    folder = Path(folder)
    precision = resolve_precision(precision, folder, FLOAT_DEFAULT[role], GGUF_DEFAULT[role])
    config = AutoConfig.from_pretrained(folder)
    spec = ModelSpec(str(folder), precision, str(folder),
                     tuple(eos_token_ids_from_config(folder, tokenizer)),
                     int(getattr(config, "max_position_embeddings", 1 << 30)), int(config.vocab_size))
    return with_weights(spec, store) if weights else spec


def with_head_cut(spec: ModelSpec, tokens: int, target_name: str = "", say=None) -> ModelSpec:
    """``spec`` (a draft model) with its LM head cut to its ``tokens`` most frequent tokens
    (``models/draft_head.py``: counted once, kept beside the model); 0, or a vocabulary no larger,
    keeps the whole head."""
    from dovetail.training.vocab import ensure_cut

    if not tokens or tokens >= spec.vocab_size:
        return replace(spec, head_cut="")
    path = ensure_cut(spec.folder, spec.vocab_size, tokens, spec.eos_token_ids, target_name, say)
    return replace(spec, head_cut=str(path))


def with_weights(spec: ModelSpec, store: ModelStore | None = None) -> ModelSpec:
    """``spec`` with the folder its weights load from: the float weights for a non-native precision."""
    if spec.precision in GGUF_PRECISIONS:
        return spec
    return replace(spec, weights=str(float_weights(spec.folder, store)))
