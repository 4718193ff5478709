"""Loading HF model folders for the two roles, and checking that their tokenizers agree.

The target is loaded in fp32 (exactness; bf16 is slower on these CPUs) with the fast small-block
linear kernel. The draft only has to propose good tokens, never exact ones (verification keeps
the output lossless), so by default it is quantised to int8 dynamic linears: ~3x faster on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dovetail.errors import UserError
from dovetail.models.fast_linear import accelerate_linears

DRAFT_PRECISIONS = ("fp32", "int8")


def default_threads() -> int:
    return len(os.sched_getaffinity(0))


def load_causal_lm(path: str | Path, *, linear_kernel: str = "stock", precision: str = "fp32"):
    """An fp32 HF causal LM in eval mode; ``precision="int8"`` quantises its linears dynamically."""
    if precision not in DRAFT_PRECISIONS:
        raise UserError(f"precision must be one of {DRAFT_PRECISIONS}, got {precision!r}")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    if precision == "int8":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
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
