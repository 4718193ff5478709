"""Loading model folders for the two roles, and checking that their tokenizers agree.

A packaged model runs its GGUF blocks natively (``models/quantized.py``); a float HF folder runs
in fp32 as the target (exactly HF's numbers, with the fast small-block linear kernel) and int8 as
the draft, which only has to propose good tokens, never exact ones (verification keeps the
output lossless). Every precision can be asked for explicitly (``PRECISIONS``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dovetail.errors import UserError
from dovetail.models.fast_linear import accelerate_linears
from dovetail.models.quantized import PRECISIONS, QUANTIZED, load_quantized, resolve_precision  # noqa: F401

FLOAT_DEFAULT = {"target": "fp32", "draft": "int8"}  # what ``auto`` means for a float checkpoint


def default_threads() -> int:
    return len(os.sched_getaffinity(0))


def load_causal_lm(path: str | Path, *, linear_kernel: str = "stock", precision: str = "fp32",
                   role: str = "target"):
    """A causal LM in eval mode at ``precision`` (see ``models/quantized.py``; ``auto``: native for a
    GGUF folder, else ``FLOAT_DEFAULT[role]``). fp32 uses ``linear_kernel``."""
    precision = resolve_precision(precision, path, FLOAT_DEFAULT[role])
    if precision == "native":
        return load_quantized(path, "native")
    from dovetail.store import float_weights

    path = float_weights(path)
    if precision in QUANTIZED:
        return load_quantized(path, precision)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    return accelerate_linears(model, linear_kernel)


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(path)


def encode_chat(tokenizer, message: str, opening: str = "") -> list[int]:
    """``message`` as one user turn through the tokenizer's chat template, then the start of the
    assistant's answer (and ``opening``): how every chat prompt is encoded."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer.encode(text + opening, add_special_tokens=False)


def eos_token_ids(model, tokenizer) -> list[int]:
    """The EOS ids HF ``generate()`` would stop on (generation config first, then tokenizer)."""
    return _eos_ids(getattr(model.generation_config, "eos_token_id", None), tokenizer)


def eos_token_ids_from_config(path: str | Path, tokenizer) -> list[int]:
    """``eos_token_ids`` without loading the weights (reads generation_config.json)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: HF falls back to the model config
        eos = getattr(AutoConfig.from_pretrained(path), "eos_token_id", None)
    return _eos_ids(eos, tokenizer)


def _eos_ids(eos, tokenizer) -> list[int]:
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def draft_vocab_limit(target_tokenizer, draft_tokenizer, target_vocab_size: int, draft_vocab_size: int) -> int:
    """Check that the draft speaks the target's token ids; return the first draft id to mask.

    Identical tokenizers pass. A draft vocabulary that only adds ids past the target's (extra
    tokens, or a padded embedding) passes, with those ids masked out of its proposals. Anything
    else raises a ``UserError`` that names the mismatch.
    """
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    moved = [tok for tok in target_vocab.keys() & draft_vocab.keys() if target_vocab[tok] != draft_vocab[tok]]
    missing = sorted(target_vocab.keys() - draft_vocab.keys(), key=target_vocab.get)
    extra_ids = sorted(draft_vocab[tok] for tok in draft_vocab.keys() - target_vocab.keys())
    if moved:
        tok = sorted(moved, key=target_vocab.get)[0]
        raise UserError(f"draft and target tokenizers differ: {len(moved)} tokens have different ids "
                        f"(e.g. {tok!r}: target id {target_vocab[tok]}, draft id {draft_vocab[tok]})")
    if missing:
        raise UserError(f"draft tokenizer lacks {len(missing)} of the target's tokens "
                        f"(e.g. {missing[0]!r}, target id {target_vocab[missing[0]]})")
    limit = min(target_vocab_size, draft_vocab_size)
    if extra_ids and extra_ids[0] < len(target_vocab):
        raise UserError(f"draft tokenizer has {len(extra_ids)} tokens the target lacks, inside the target's "
                        f"id range (first id {extra_ids[0]})")
    if extra_ids:
        limit = min(limit, extra_ids[0])
    return limit
