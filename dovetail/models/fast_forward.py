"""The decoder forward of a quantized model (every family of ``architectures.py``), without HF's
module machinery.

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

The layers run in one C++ call (``decoder_layers``, ``kernels/csrc/layer.cpp``): the same
operators in the same order on the same data as the per-operator path (``_layer_ops``), so the
same bits, without the Python between them (some fifteen calls, views and module wrappers a
layer); the new keys and values go straight into the cache's buffers (``AppendingLayer.reserve``).

Tensor parallelism works unchanged: a shard's o/down projections, LM head and embedding are
wrapped for their all-reduce / all-gather (``tp.py``), so its layers run operator by operator,
calling those projections as modules (as does a forward into a cache of other layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dovetail.kernels import ops
from dovetail.models.architectures import ACTIVATIONS, of_config, sliding_window
from dovetail.models.kv_cache import AppendingLayer
from dovetail.models.quantized import QuantLinear
from dovetail.models.row_attention import visible_keys, windowed

PROJECTIONS = {  # the linears the forward calls as matrices; the others run as modules (tp.py wraps them)
    False: (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))),
    True: (("self_attn", ("qkv_proj",)), ("mlp", ("gate_up_proj",))),
}


def _quant(module) -> QuantLinear | None:
    """The QuantLinear behind ``module`` (itself, or the inner linear of a tensor-parallel wrapper)."""
    inner = getattr(module, "inner", module)
    return inner if isinstance(inner, QuantLinear) else None


def supports(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a quantized decoder this forward reproduces (else HF's forward runs)."""
    config = model.config
    family = of_config(config)
    if family is None or getattr(config, family.activation_key, "silu") not in ACTIVATIONS:
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return False
    if (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0:
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return False
    fused = family.fused_qkv
    for layer in layers:
        for part, names in PROJECTIONS[fused]:
            if any(_quant(getattr(getattr(layer, part), n, None)) is None for n in names):
                return False
        if _quant(layer.self_attn.o_proj) is None or _quant(layer.mlp.down_proj) is None:
            return False
    return family.fused_qkv == family.fused_gate_up


def _static(rotary) -> bool:
    """Whether a rotary embedding's tables depend on the position alone (dynamic NTK and LongRoPE
    scaling recompute them from the forward's longest position)."""
    kinds = getattr(rotary, "rope_type", None)
    kinds = kinds.values() if isinstance(kinds, dict) else [kinds]
    return all(isinstance(k, str) and "dynamic" not in k and k != "longrope" for k in kinds)


def _norm(module, offset: float) -> tuple[torch.Tensor, float]:
    """(the weight the kernel multiplies by, eps) of an RMSNorm module (``offset``: see ``Architecture``)."""
    eps = getattr(module, "variance_epsilon", None)
    return module.weight.detach().float() + offset, float(module.eps if eps is None else eps)


class FastForward:
    """``hidden(ids, positions, mask, cache)`` -> the final-norm hidden states [L, hidden]."""

    def __init__(self, model: torch.nn.Module):
        backbone, config = model.model, model.config
        family = of_config(config)
        self.family = family
        self.embed, self.rotary, self.final = backbone.embed_tokens, backbone.rotary_emb, _norm(backbone.norm, family.norm_offset)
        self.ops = ops()
        act = getattr(config, family.activation_key, "silu")
        self.activation = (lambda x: F.silu(x, inplace=True)) if act == "silu" else (
            lambda x: F.gelu(x, approximate="tanh"))
        types = getattr(config, "layer_types", None) or ["full_attention"] * len(backbone.layers)
        self.layers = []
        for i, layer in enumerate(backbone.layers):
            attn, mlp = layer.self_attn, layer.mlp
            head_dim, offset = attn.head_dim, family.norm_offset
            p = dict(ln1=_norm(layer.input_layernorm, offset), o=attn.o_proj, down=mlp.down_proj,
                     head_dim=head_dim, scale=float(attn.scaling), window=sliding_window(config, i),
                     rope=types[i] if family.rope_per_layer_type else None)
            if family.fused_qkv:
                p.update(qkv=_quant(attn.qkv_proj), gate_up=_quant(mlp.gate_up_proj))
            else:
                p.update(q=_quant(attn.q_proj), k=_quant(attn.k_proj), v=_quant(attn.v_proj),
                         gate=_quant(mlp.gate_proj), up=_quant(mlp.up_proj))
            if family.qk_norm:
                p.update(q_norm=_norm(attn.q_norm, offset), k_norm=_norm(attn.k_norm, offset))
            if family.sandwich_norms:
                p.update(post_attn=_norm(layer.post_attention_layernorm, offset),
                         pre_mlp=_norm(layer.pre_feedforward_layernorm, offset),
                         post_mlp=_norm(layer.post_feedforward_layernorm, offset))
            else:
                p.update(pre_mlp=_norm(layer.post_attention_layernorm, offset))
            if family.fused_qkv:  # this shard's q | k | v: the head counts follow from the grouping
                kv_heads = p["qkv"].out_features // head_dim // (attn.num_key_value_groups + 2)
                heads = kv_heads * attn.num_key_value_groups
            else:
                heads, kv_heads = p["q"].out_features // head_dim, p["k"].out_features // head_dim
            p.update(heads=heads, kv_heads=kv_heads, q_rows=heads * head_dim, kv_rows=kv_heads * head_dim,
                     like=torch.empty(1, kv_heads, 0, head_dim))  # the shape of its cache rows
            self.layers.append(p)
        self.rope_kinds = list(dict.fromkeys(p["rope"] for p in self.layers))
        self.static_rope, self._tables = _static(self.rotary), {}
        first = self.layers[0]
        self.isa = (first["qkv"] if family.fused_qkv else first["q"]).isa
        for i, p in enumerate(self.layers):
            p["next"] = self.layers[i + 1]["ln1"] if i + 1 < len(self.layers) else self.final
        # the native decoder: every layer in one C++ call, unless a shard's o/down projections are
        # wrapped for their all-reduce (those run as modules, layer by layer)
        native = all(_quant(p[m]) is p[m] for p in self.layers for m in ("o", "down"))
        self.decoder = self._native(act != "silu") if native else None
        self.rope_of = [p["rope"] for p in self.layers]
        self.seen_of = [(p["rope"], p["window"]) for p in self.layers]

    def _native(self, gelu: bool):
        """The layers as the C++ decoder of ``kernels/csrc/layer.cpp``."""
        linear = lambda m: self.ops.QLinear(*m._weight_args)
        layers = []
        for p in self.layers:
            qkv = [p["qkv"]] if "qkv" in p else [p["q"], p["k"], p["v"]]
            gate_up = [p["gate_up"]] if "gate_up" in p else [p["gate"], p["up"]]
            layers.append(self.ops.DecoderLayer(
                [linear(m) for m in qkv], linear(p["o"]), [linear(m) for m in gate_up], linear(p["down"]), p["ln1"],
                p.get("q_norm"), p.get("k_norm"), p.get("post_attn"), p["pre_mlp"], p.get("post_mlp"),
                p["heads"], p["kv_heads"], p["head_dim"], p["scale"], gelu, self.isa))
        return self.ops.Decoder(layers, self.final)

    def _rotary(self, h: torch.Tensor, positions: torch.Tensor) -> dict:
        """cos, sin [L, head_dim] at ``positions``, per rotary table. A static rotary embedding is
        elementwise in the position, so its rows are computed for a range of positions once and
        looked up after (the same bits); a dynamic one (its frequencies follow the forward's longest
        position) runs for each forward."""
        out = {}
        top = int(positions.max()) + 1 if self.static_rope else 0
        for kind in self.rope_kinds:
            args = (kind,) if kind is not None else ()
            if not self.static_rope:
                cos, sin = self.rotary(h, positions.view(1, -1), *args)
                out[kind] = cos[0].float().contiguous(), sin[0].float().contiguous()
                continue
            table = self._tables.get(kind)
            if table is None or table[0].shape[0] < top:
                cos, sin = self.rotary(h, torch.arange(max(1024, 2 * top)).view(1, -1), *args)
                table = self._tables[kind] = cos[0].float().contiguous(), sin[0].float().contiguous()
            out[kind] = table[0].index_select(0, positions), table[1].index_select(0, positions)
        return out

    def _qkv(self, p, xq, xs):
        if "qkv" not in p:
            return p["q"].forward_quantized(xq, xs), p["k"].forward_quantized(xq, xs), p["v"].forward_quantized(xq, xs)
        y = p["qkv"].forward_quantized(xq, xs)
        q, kv = p["q_rows"], p["kv_rows"]
        return y[:, :q].contiguous(), y[:, q:q + kv].contiguous(), y[:, q + kv:]

    def _gate_up(self, p, xq, xs):
        if "gate_up" not in p:
            return p["gate"].forward_quantized(xq, xs), p["up"].forward_quantized(xq, xs)
        y = p["gate_up"].forward_quantized(xq, xs)
        half = y.shape[1] // 2
        return y[:, :half], y[:, half:]

    def _visible(self, mask, positions, length: int, kv_len: int) -> dict:
        """Which keys each query row sees, per (rotary table, window) of a layer: the causal (or
        tree) mask, and for sliding-window layers only keys less than the window behind. A mask
        given per layer type (``cached_lm.forward_blocks``) carries its windows already."""
        out = {}
        for p in self.layers:
            key = (p["rope"], p["window"])
            if key in out:
                continue
            if isinstance(mask, dict):
                seen = visible_keys(mask["sliding_attention" if p["window"] else "full_attention"], length, kv_len)
            else:
                seen = visible_keys(mask, length, kv_len)
                if mask is None and p["window"]:
                    seen = windowed(seen, positions, torch.arange(kv_len), p["window"])
            out[key] = seen.to(torch.uint8).contiguous()
        return out

    @torch.inference_mode()
    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, mask, cache) -> torch.Tensor:
        o = self.ops
        length = ids.shape[-1]
        h = self.embed(ids.view(1, -1))  # [1, L, H]
        tables = self._rotary(h, positions.view(-1))
        h = h[0].float().contiguous()
        visible = self._visible(mask, positions.view(-1), length, cache.get_seq_length() + length)
        w, eps = self.layers[0]["ln1"]
        x = o.rms_norm(h, w, eps)
        layers = cache.layers
        if self.decoder is not None and len(layers) == len(self.layers) and all(
                type(layer) is AppendingLayer for layer in layers):  # its keys and values go into the buffers
            rows = [layer.reserve(p["like"], length) for layer, p in zip(layers, self.layers)]
            return o.decoder_layers(self.decoder, 0, len(layers), h, x, [tables[r][0] for r in self.rope_of],
                                    [tables[r][1] for r in self.rope_of], [layer._k for layer in layers],
                                    [layer._v for layer in layers], rows, [visible[k] for k in self.seen_of])
        for i, p in enumerate(self.layers):
            cos, sin = tables[p["rope"]]
            x = self._layer_ops(i, p, h, x, cos, sin, visible[p["rope"], p["window"]], cache)
        return x

    def _layer_ops(self, i: int, p: dict, h, x, cos, sin, seen, cache) -> torch.Tensor:
        """Layer ``i`` operator by operator (what the native decoder computes, ``decoder_layers``): h
        is updated in place; returns the next layer's normed input."""
        o, length, d = self.ops, x.shape[0], p["head_dim"]
        xq, xs = o.quantize_rows(x, self.isa)
        q, k, v = self._qkv(p, xq, xs)
        if "q_norm" in p:  # per head, before the rotary embedding
            q = o.rms_norm(q.view(length * p["heads"], d), *p["q_norm"]).view(length, -1)
            k = o.rms_norm(k.view(length * p["kv_heads"], d), *p["k_norm"]).view(length, -1)
        o.rope_(q, cos, sin)
        o.rope_(k, cos, sin)
        keys, values = cache.update(k.view(length, p["kv_heads"], d).transpose(0, 1)[None],
                                    v.reshape(length, p["kv_heads"], d).transpose(0, 1)[None], i)
        a = o.row_attention(q.view(length, p["heads"], d).transpose(0, 1), keys[0], values[0], seen, p["scale"],
                            self.isa)
        a = p["o"](a.view(length, -1))
        if "post_attn" in p:
            a = o.rms_norm(a, *p["post_attn"])
        x = o.add_rms_norm_(h, a, *p["pre_mlp"])
        xq, xs = o.quantize_rows(x, self.isa)
        gate, up = self._gate_up(p, xq, xs)
        m = p["down"](self.activation(gate).mul_(up))
        if "post_mlp" in p:
            m = o.rms_norm(m, *p["post_mlp"])
        return o.add_rms_norm_(h, m, *p["next"])
