"""Quantized models: GGUF block weights run as they are, or float checkpoints quantized on load.

Precisions (``--target-precision`` / ``--draft-precision``):
  ``native``  the GGUF file's own blocks (Q4_K, Q6_K, Q5_0, Q8_0, ...), repacked, never widened;
  ``int8``    a float checkpoint quantized on load to Q8_0 (32-weight groups, round to nearest);
  ``int4``    the same to Q4_K (Q4_0 where a row is not a multiple of 256 weights);
  ``fp32``    dense floats (the dequantized checkpoint), token-identical to HF fp32;
  ``auto``    ``native`` for a model folder holding a GGUF file, else the role's float default.

Every linear becomes a ``QuantLinear`` and the token embedding a ``QuantEmbedding`` (rows
dequantized on lookup, exactly); norms and biases stay fp32. The rest of the HF module runs
unchanged, so caching, tree masks and tensor parallelism work as for fp32 models.

Where tensors come from (a GGUF file's blocks, the same re-encoded, a float checkpoint):
``models/weight_sources.py``. Tensor parallelism: a shard decodes only its own rows (output splits) or its own super-blocks
(input splits) of each tensor, straight from the memory-mapped GGUF file. The MLP is split on
super-block boundaries, so an intermediate size that is not a multiple of ``256 * shards`` (e.g.
8960 = 35 super-blocks) gets an uneven split.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from dovetail.errors import UserError
from dovetail.kernels import kernel_isa, ops
from dovetail.kernels.arena import WeightArena
from dovetail.kernels.formats import SCHEMES
from dovetail.kernels.packing import PackedWeight, pack
from dovetail.models.slices import Span, shard_spans, split_of
from dovetail.models.weight_sources import EMBED_NAME, FloatSource, open_source


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with W in the kernel's packed layout (inference only)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.qtype = packed.cols, packed.rows, packed.qtype
        for name in ("q", "D", "Dm", "sc", "mn"):
            self.register_buffer(name, getattr(packed, name), persistent=False)
        self.scheme = packed.scheme_args()
        self.bias = None if bias is None else nn.Parameter(bias.float().contiguous(), requires_grad=False)
        self.isa = kernel_isa()
        # the kernel's arguments, gathered once: a module attribute lookup per call costs more than
        # a small linear's arithmetic (buffers are never reassigned after construction)
        self._weight_args = (self.q, self.D, self.Dm, self.sc, self.mn, self.out_features, *self.scheme, self.isa,
                             self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.forward_quantized(*ops().quantize_rows(x.reshape(-1, self.in_features), self.isa))
        return y.view(*shape[:-1], self.out_features)

    def forward_quantized(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """[M, out] from activations already quantized by ``ops().quantize_rows`` (shareable
        between linears that read the same input)."""
        return ops().qmatmul_quantized(xq, xs, *self._weight_args)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of W as fp32 (exact): the whole matrix by default."""
        rows = torch.arange(self.out_features) if rows is None else rows
        return ops().dequantize_rows(self.q, self.D, self.Dm, self.sc, self.mn, self.out_features, self.in_features,
                                     *self.scheme, rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.D, self.Dm, self.sc, self.mn))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.qtype.name}"


class QuantEmbedding(nn.Module):
    """A token embedding kept quantized: looked-up rows are dequantized exactly (then multiplied by
    ``scale`` where the model scales its embeddings, as Gemma does by sqrt(hidden))."""

    def __init__(self, table: QuantLinear, scale: torch.Tensor | None = None):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.scale = None if scale is None else scale.float()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantize(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)
        return rows if self.scale is None else rows * self.scale


# -- building the model ------------------------------------------------------------------------------
def balanced(total: int, unit: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s share of ``total`` items cut on multiples of ``unit`` (the first ranks get more)."""
    units = total // unit
    lo = rank * (units // world) + min(rank, units % world)
    hi = lo + units // world + (rank < units % world)
    return lo * unit, (hi * unit if rank < world - 1 else total)


def shard_ranges(config, source, rank: int, world: int) -> dict[str, list[Span]]:
    """This rank's spans of each split (``slices.shard_spans``), the MLP cut on block edges."""
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    for name, size in (("attention heads", config.num_attention_heads), ("KV heads", kv_heads),
                       ("vocabulary", config.vocab_size)):
        if size % world:
            raise UserError(f"cannot split this model into {world} shards: {name} ({size}) not divisible by {world}")
    unit = 1
    for i in range(config.num_hidden_layers):  # the MLP splits where every layer's down_proj has a block edge
        qtype = source.format_of(f"model.layers.{i}.mlp.down_proj.weight")
        if qtype is not None:
            unit = max(unit, SCHEMES[qtype].superblock)
    if config.intermediate_size < unit * world:
        raise UserError(f"cannot split an MLP of {config.intermediate_size} into {world} shards of whole "
                        f"{unit}-weight blocks")
    spans = shard_spans(config, rank, world, mlp=balanced(config.intermediate_size, unit, rank, world))
    q_cols = spans["q"][0][1] - spans["q"][0][0]
    for i in range(config.num_hidden_layers):  # o_proj's input columns split by heads: on block edges too?
        qtype = source.format_of(f"model.layers.{i}.self_attn.o_proj.weight")
        if qtype is not None and q_cols % SCHEMES[qtype].superblock:
            raise UserError(f"cannot split this model into {world} shards: each shard's attention output "
                            f"({q_cols} columns of o_proj, {qtype.name}) is not whole "
                            f"{SCHEMES[qtype].superblock}-weight blocks")
    return spans


def load_quantized(path: str | Path, precision: str, rank: int = 0, world: int = 1,
                   head_ids: np.ndarray | None = None) -> nn.Module:
    """The causal LM in ``path`` with quantized linears and embedding: all of it (``world=1``) or
    shard ``rank`` of ``world`` (tensor-parallel slices; the caller adds the collectives).
    ``head_ids``: keep only these rows of the LM head (a draft's cut head, ``draft_head.py``)."""
    if head_ids is not None and world > 1:
        raise ValueError("a cut head is for a draft model, which is never sharded")
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    source = open_source(path, precision, config)
    spans = shard_ranges(config, source, rank, world) if world > 1 else None
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    arena = WeightArena()  # the packed weights on huge pages, freed with the model

    def quant_linear(weight_name: str, bias: torch.Tensor | None) -> nn.Module:
        rows, cols = split_of(weight_name, spans)
        if source.format_of(weight_name) is None:  # a float tensor inside a GGUF file: keep it dense
            from dovetail.models.fast_linear import FastLinear

            w = source.dense(weight_name, rows)
            if cols is not None:
                w = w[:, cols[0]:cols[1]].contiguous()
            dense = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
            dense.weight = nn.Parameter(w, requires_grad=False)
            if bias is not None:
                dense.bias = nn.Parameter(bias, requires_grad=False)
            return FastLinear(dense, "mm")
        return QuantLinear(pack(source.decoded(weight_name, rows, cols), arena), bias)

    for name, linear in linears:
        weight_name = f"{name}.weight"
        bias = None
        if linear.bias is not None:
            rows, _ = split_of(f"{name}.bias", spans)
            bias = source.dense(f"{name}.bias", rows)
            if rank > 0 and re.search(r"\.(o_proj|down_proj)$", name):
                bias = torch.zeros_like(bias)  # a row-parallel bias is added once, not once per shard
        if name == "lm_head" and (head_ids is not None or not source.has(weight_name)):
            continue  # a tied head shares the embedding's blocks; a cut one is made below
        module = quant_linear(weight_name, bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    table = quant_linear(EMBED_NAME, None)
    if not isinstance(table, QuantLinear):
        raise UserError(f"{path}: the token embedding is not in a quantized format")
    model.model.embed_tokens = QuantEmbedding(table, getattr(model.model.embed_tokens, "embed_scale", None))
    if head_ids is not None:
        from dovetail.models.draft_head import CutHead

        head_name = "lm_head.weight" if source.has("lm_head.weight") else EMBED_NAME
        if source.format_of(head_name) is None:
            raise UserError(f"{path}: a cut head needs a quantized LM head")
        model.lm_head = CutHead(QuantLinear(pack(source.decoded(head_name, None, None).take_rows_index(head_ids),
                                                 arena)), head_ids, config.vocab_size)
    elif not source.has("lm_head.weight"):
        model.lm_head = table
    for name, param in list(model.named_parameters()):  # norms (and anything else left on meta)
        if param.device.type != "meta":
            continue
        module_name, _, param_name = name.rpartition(".")
        rows, _ = split_of(name, spans)
        setattr(model.get_submodule(module_name), param_name, nn.Parameter(source.dense(name, rows), requires_grad=False))
    if isinstance(source, FloatSource):
        source.close()
    del source
    from dovetail.models.row_attention import use_row_attention

    use_row_attention(model)  # verification must reproduce plain decoding bit for bit (see there)
    return model.eval()

