"""What sets each supported decoder family apart, as data.

Every family here is a pre-norm decoder with rotary attention and a gated MLP; they differ in a
handful of details, each one a field of ``Architecture``. The GGUF loader (``quantized.py``), the
tensor-parallel split (``slices.py``, ``tp.py``) and the lean forward (``fast_forward.py``) read
these fields; none of them branches on a family's name. Adding a family means adding a row here
and a random-weight GGUF test (``tests/test_architectures.py``) that checks it against transformers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    gguf: str  # ``general.architecture`` of its GGUF files
    model_types: tuple[str, ...]  # transformers' ``config.model_type`` for it
    permuted_qk: bool = False  # llama.cpp stores q/k rows interleaved for its RoPE (HF's order is restored)
    norm_offset: float = 0.0  # GGUF norm weights are HF's plus this (HF's norm multiplies by offset + w)
    qk_norm: bool = False  # an RMSNorm over each head of q and of k, before the rotary embedding
    sandwich_norms: bool = False  # attention and MLP outputs are normed too, before the residual add
    rope_per_layer_type: bool = False  # sliding and full layers have rotary tables of their own
    fused_qkv: bool = False  # q, k and v are one projection (``qkv_proj``), rows q | k | v
    fused_gate_up: bool = False  # gate and up are one projection (``gate_up_proj``), rows gate | up
    activation_key: str = "hidden_act"  # the config field naming the gated MLP's activation


ARCHITECTURES = (
    Architecture("llama", ("llama", "mistral"), permuted_qk=True),
    Architecture("qwen2", ("qwen2",)),
    Architecture("qwen3", ("qwen3",), qk_norm=True),
    Architecture("gemma3", ("gemma3_text",), norm_offset=1.0, qk_norm=True, sandwich_norms=True,
                 rope_per_layer_type=True, activation_key="hidden_activation"),
    Architecture("phi3", ("phi3",), fused_qkv=True, fused_gate_up=True),
)
GGUF_NAMES = tuple(a.gguf for a in ARCHITECTURES)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # those the lean forward computes


def by_gguf_name(name: str) -> Architecture | None:
    return next((a for a in ARCHITECTURES if a.gguf == name), None)


def of_config(config) -> Architecture | None:
    return next((a for a in ARCHITECTURES if config.model_type in a.model_types), None)


def sliding_window(config, layer: int) -> int | None:
    """The attention window of ``layer`` (keys at most window - 1 positions back), or None."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return config.sliding_window if types[layer] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)  # no layer types: one window for every layer (Phi-3)


def has_sliding_layers(config) -> bool:
    return any(sliding_window(config, i) for i in range(config.num_hidden_layers))
