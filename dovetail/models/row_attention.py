"""Block-independent attention for quantized targets (registered with transformers as
``dovetail_rows``).

Speculative verification is lossless only if a token gets the same logits inside a draft block
as when decoded alone. The quantized linears compute each row on its own (``kernels/csrc``), but a
library attention kernel blocks its work by shape, so a token's attention output can differ in
the last bits between a 1-row and an n-row forward; with int8 activations such a difference can
flip a rounding and move logits by far more. This attention computes every query row from its
visible keys, in cache order, with a fixed order of operations (C++ kernel), so the whole
forward is row-independent and verification reproduces plain decoding bit for bit.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from dovetail.kernels import kernel_isa, ops

NAME = "dovetail_rows"


def visible_keys(mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor:
    """[q_len, kv_len] bool: which keys each query row sees (None: causal, queries last)."""
    if mask is None:
        rows = torch.arange(q_len)[:, None] + (kv_len - q_len)
        return torch.arange(kv_len)[None, :] <= rows
    m = mask[0, 0] if mask.dim() == 4 else mask
    return m if m.dtype == torch.bool else m == 0


def windowed(visible: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor,
             window: int) -> torch.Tensor:
    """``visible`` without the keys ``window`` or more positions behind their query: what a
    sliding-window layer sees (transformers' rule)."""
    return visible & ((query_positions[:, None] - key_positions[None, :]) < window)


UNSUPPORTED = ("softcap", "s_aux")  # logit softcapping, attention sinks: refused, never ignored


def row_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"dovetail_rows attention does not implement {name!r}, which this model uses")
    if query.shape[0] != 1:
        raise ValueError("dovetail_rows attention runs one sequence per forward (batches are laid side by side)")
    q_len, kv_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    visible = visible_keys(attention_mask, q_len, kv_len)
    out = ops().row_attention(query[0], key[0], value[0], visible, scale, kernel_isa())
    return out[None].to(query.dtype), None


AttentionInterface.register(NAME, row_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_row_attention(model: torch.nn.Module) -> None:
    model.set_attn_implementation(NAME)
