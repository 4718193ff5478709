"""The decoder forward of a quantized Llama/Qwen2-family model, without HF's module machinery.

HF's forward runs some fifty small tensor operators per layer (norm, rotary, cache bookkeeping,
mask conversion, dtype casts) around the seven linears: a large share of a small model's 1-token
step, and the draft runs several such steps per verification. This forward
runs the same model from the same modules and the same cache in about a dozen calls per layer:
one C++ call each for RMSNorm (fused with the residual add), the rotary embedding and the
attention; one activation quantization shared by q/k/v and one by gate/up.

Exactness: every operator here computes each row on its own in a fixed order (``kernels/csrc``),
so a token's logits are bit-identical whether it is decoded alone, in a tree or in a batch, which
is what lossless verification needs. The target's plain decoding runs this same forward. (It is not
bit-identical to HF's forward of the same weights: the norm sums in another order.)

Tensor parallelism works unchanged: o/down projections, the LM head and the embedding are called
as modules, so a shard's all-reduce / all-gather wrappers (``tp.py``) run as they do under HF.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dovetail.kernels import ops
from dovetail.models.quantized import QuantLinear
from dovetail.models.row_attention import visible_keys

SUPPORTED_TYPES = ("llama", "qwen2")


def _quant(module) -> QuantLinear | None:
    """The QuantLinear behind ``module`` (itself, or the inner linear of a tensor-parallel wrapper)."""
    inner = getattr(module, "inner", module)
    return inner if isinstance(inner, QuantLinear) else None


def supports(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a quantized decoder this forward reproduces (else HF's forward runs)."""
    config = model.config
    if config.model_type not in SUPPORTED_TYPES or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if getattr(config, "use_sliding_window", False):
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return False
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if any(_quant(getattr(attn, n)) is None for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return False
        if any(_quant(getattr(mlp, n)) is None for n in ("gate_proj", "up_proj", "down_proj")):
            return False
        if not hasattr(layer.input_layernorm, "variance_epsilon"):
            return False
    return True


class FastForward:
    """``hidden(ids, positions, mask, cache)`` -> the final-norm hidden states [L, hidden]."""

    def __init__(self, model: torch.nn.Module):
        backbone = model.model
        self.embed, self.rotary, self.norm = backbone.embed_tokens, backbone.rotary_emb, backbone.norm
        self.ops = ops()
        self.layers = []
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            head_dim = attn.head_dim
            self.layers.append(dict(
                ln1=layer.input_layernorm.weight.detach(), ln2=layer.post_attention_layernorm.weight.detach(),
                eps=float(layer.input_layernorm.variance_epsilon),
                q=_quant(attn.q_proj), k=_quant(attn.k_proj), v=_quant(attn.v_proj), o=attn.o_proj,
                gate=_quant(mlp.gate_proj), up=_quant(mlp.up_proj), down=mlp.down_proj,
                head_dim=head_dim, scale=float(attn.scaling),
                heads=_quant(attn.q_proj).out_features // head_dim,
                kv_heads=_quant(attn.k_proj).out_features // head_dim))
        self.final_eps = float(self.norm.variance_epsilon)
        self.isa = self.layers[0]["q"].isa

    @torch.inference_mode()
    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        o = self.ops
        length = ids.shape[-1]
        h = self.embed(ids.view(1, -1))  # [1, L, H]
        cos, sin = self.rotary(h, positions.view(1, -1))
        cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        h = h[0].float().contiguous()
        visible = visible_keys(mask, length, cache.get_seq_length() + length).to(torch.uint8).contiguous()
        x = o.rms_norm(h, self.layers[0]["ln1"], self.layers[0]["eps"])
        for i, p in enumerate(self.layers):
            xq, xs = o.quantize_rows(x, self.isa)
            q, k, v = p["q"].forward_quantized(xq, xs), p["k"].forward_quantized(xq, xs), p["v"].forward_quantized(xq, xs)
            o.rope_(q, cos, sin)
            o.rope_(k, cos, sin)
            d = p["head_dim"]
            keys, values = cache.update(k.view(length, p["kv_heads"], d).transpose(0, 1)[None],
                                        v.view(length, p["kv_heads"], d).transpose(0, 1)[None], i)
            a = o.row_attention(q.view(length, p["heads"], d).transpose(0, 1), keys[0], values[0], visible, p["scale"],
                                self.isa)
            x = o.add_rms_norm_(h, p["o"](a.view(length, -1)), p["ln2"], p["eps"])
            xq, xs = o.quantize_rows(x, self.isa)
            gate = p["gate"].forward_quantized(xq, xs)
            gate = F.silu(gate, inplace=True).mul_(p["up"].forward_quantized(xq, xs))
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            w, eps = (nxt["ln1"], nxt["eps"]) if nxt else (self.norm.weight.detach(), self.final_eps)
            x = o.add_rms_norm_(h, p["down"](gate), w, eps)
        return x
