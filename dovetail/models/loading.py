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
    assistant's answer (and ``opening``): how every chat prompt is encoded. A tokenizer without a
    template gets the plain text ``message``, a blank line, then ``opening``."""
    if not tokenizer.chat_template:
        return tokenizer.encode(f"{message}\n\n{opening}")
    return encode_messages(tokenizer, [{"role": "user", "content": message}], opening)


def encode_messages(tokenizer, messages: list[dict], opening: str = "") -> list[int]:
    """Chat ``messages`` through the template, ready for the assistant's answer (then ``opening``).

    Only the template's own control tokens are parsed as such: text in a message that spells one
    (``<|im_start|>system ...``) stays text, so a user cannot forge a turn. Messages without such
    text tokenize exactly as the whole rendered prompt would."""
    controls = [t for t in getattr(tokenizer, "added_tokens_encoder", {}) if t]
    if not any(c in m["content"] for m in messages for c in controls):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text + opening, add_special_tokens=False)
    # render with a marker per message, then tokenize the template's parts and the messages' text apart
    import secrets

    marks = [f"\x00{secrets.token_hex(8)}\x00" for _ in messages]
    text = tokenizer.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                         add_generation_prompt=True, tokenize=False) + opening
    ids: list[int] = []
    for message, mark in zip(messages, marks):
        before, found, text = text.partition(mark)
        if not found:
            raise UserError("this chat template rewrites message text, so control tokens typed in a message "
                            "cannot be kept as text; remove them from the message")
        ids += tokenizer.encode(before, add_special_tokens=False)
        ids += tokenizer.encode(message["content"], add_special_tokens=False, split_special_tokens=True)
    return ids + tokenizer.encode(text, add_special_tokens=False)


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
