"""Tensor-parallel sharding of an HF decoder across CPU sockets (Megatron layout, gpt-fast style).

Per decoder layer, shard r of n holds:
  q/k/v projections: the rows of its attention heads (q heads and GQA KV heads split evenly;
                     a fused qkv projection holds its rows of each of the three)
  o projection:      the matching input columns -> partial sums, all-reduced
  gate/up:           its slice of the MLP intermediate dimension (of both halves when fused)
  down projection:   the matching input columns -> partial sums, all-reduced
  LM head:           its slice of the vocabulary -> logits all-gathered
  embeddings:        its slice of the vocabulary -> rows outside it are zero, all-reduced
Norms are replicated. A tied LM head shares its shard's embedding slice. HF attention infers the head count from the projection
width, so the stock modules run unchanged on the slices.

Each shard reads only its own slices' bytes from the safetensors files (``SliceReader``), so its
peak memory is about model/n plus the replicated norms, never the whole model.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from dovetail.errors import UserError
from dovetail.protocol.collectives import Collective
from dovetail.models.fast_linear import accelerate_linears
from dovetail.models.slices import SliceReader, shard_spans, split_of, weight_files
from dovetail.models.spec import QUANTIZED, ModelSpec


def check_shardable(config, world_size: int) -> None:
    """Refuse a sharding that does not divide the model evenly, naming what does not divide."""
    sizes = {"attention heads": config.num_attention_heads,
             "KV heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
             "MLP intermediate size": config.intermediate_size, "vocabulary": config.vocab_size}
    bad = [f"{name} ({size})" for name, size in sizes.items() if size % world_size]
    if world_size < 1 or bad:
        raise UserError(f"cannot split this model into {world_size} shards: {', '.join(bad) or 'need >= 1'} "
                        f"not divisible by {world_size}")


def load_shard(spec: ModelSpec, collective: Collective, linear_kernel: str = "mm") -> nn.Module:
    """Build this rank's shard of the model ``spec`` describes, reading only its slices."""
    from dovetail.models.quantized import load_quantized

    n, r = collective.world_size, collective.rank
    if spec.precision in QUANTIZED:
        model = load_quantized(spec.weights, spec.precision, r, n)
    else:
        model = _load_float_shard(Path(spec.weights), r, n, linear_kernel)
    if n > 1:
        vocab_lo = r * model.config.vocab_size // n
        for layer in model.model.layers:
            _hold_local_heads(layer.self_attn, n)
            layer.self_attn.o_proj = _Reduced(layer.self_attn.o_proj, collective)
            layer.mlp.down_proj = _Reduced(layer.mlp.down_proj, collective)
        model.lm_head = _Gathered(model.lm_head, collective)
        model.model.embed_tokens = _VocabParallelEmbedding(model.model.embed_tokens, vocab_lo, collective)
    return model


def _load_float_shard(path: Path, r: int, n: int, linear_kernel: str) -> nn.Module:
    """Rank ``r``'s fp32 slices of the float checkpoint in ``path`` (no collectives yet)."""
    config = AutoConfig.from_pretrained(path)
    check_shardable(config, n)
    spans = shard_spans(config, r, n) if n > 1 else None
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    files = weight_files(path)
    tied = getattr(config, "tie_word_embeddings", False)
    state: dict[str, torch.Tensor] = {}
    loaded: dict[str, torch.Tensor] = {}  # source name -> this shard's slice (a tied head reuses it)
    readers: dict[Path, SliceReader] = {}
    for name in model.state_dict():
        source = "model.embed_tokens.weight" if (tied and name == "lm_head.weight") else name
        if source in loaded:
            state[name] = loaded[source]
            continue
        file = files[source]
        reader = readers.get(file) or readers.setdefault(file, SliceReader(file))
        rows, cols = split_of(source, spans)
        if rows is not None:
            tensor = torch.cat([reader.read(source, 0, lo, hi) for lo, hi in rows])
        elif cols is not None:
            tensor = reader.read(source, 1, *cols)
        else:
            tensor = reader.read(source)
        if r > 0 and re.search(r"\.(o_proj|down_proj)\.bias$", name):
            tensor = torch.zeros_like(tensor)  # a row-parallel bias is added once, not once per shard
        state[name] = loaded[source] = tensor.to(torch.float32).contiguous()
    for name, tensor in state.items():  # slices do not match the full config's shapes: place them
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, param_name, nn.Parameter(tensor, requires_grad=False))
        if isinstance(module, nn.Linear) and param_name == "weight":
            module.out_features, module.in_features = tensor.shape
        if isinstance(module, nn.Embedding) and param_name == "weight":
            module.num_embeddings = tensor.shape[0]
            module.padding_idx = None  # it may lie outside this slice; inference never uses it
    for reader in readers.values():
        reader.close()
    del state, loaded, readers
    model.eval()
    return accelerate_linears(model, linear_kernel)


def _hold_local_heads(attention: nn.Module, n: int) -> None:
    """Give a shard's attention module its own head counts: some modules read them from the config
    (Phi-3 cuts its fused qkv output at ``num_attention_heads * head_dim``), not from the widths."""
    config = copy.copy(attention.config)
    config.num_attention_heads //= n
    config.num_key_value_heads = getattr(config, "num_key_value_heads", attention.config.num_attention_heads) // n
    attention.config = config
    if hasattr(attention, "num_key_value_heads"):
        attention.num_key_value_heads = config.num_key_value_heads


class _VocabParallelEmbedding(nn.Module):
    """This shard's rows of the embedding (dense or quantized); ids outside them embed to zero;
    all-reduced. (An inference lookup ignores padding_idx, so the inner module can take any id.)"""

    def __init__(self, inner: nn.Module, first_id: int, collective: Collective):
        super().__init__()
        self.inner, self.first_id, self.collective = inner, first_id, collective

    def forward(self, ids):
        local = ids - self.first_id
        outside = (local < 0) | (local >= self.inner.num_embeddings)
        out = self.inner(local.masked_fill(outside, 0))
        return self.collective.all_reduce(out.masked_fill(outside[..., None], 0.0))


class _Reduced(nn.Module):
    """A row-parallel linear: local partial product, then an all-reduce (sum) across shards."""

    def __init__(self, inner: nn.Module, collective: Collective):
        super().__init__()
        self.inner, self.collective = inner, collective

    def forward(self, x):
        return self.collective.all_reduce(self.inner(x))


class _Gathered(nn.Module):
    """A vocabulary-parallel LM head: local logits, all-gathered into the full vocabulary."""

    def __init__(self, inner: nn.Module, collective: Collective):
        super().__init__()
        self.inner, self.collective = inner, collective

    def forward(self, x):
        return self.collective.all_gather_last_dim(self.inner(x))
