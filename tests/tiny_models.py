"""Tiny random Llama/Qwen2 models built from configs, for fast exact tests (no downloads)."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

VOCAB = 96


def tiny_config(arch: str = "llama", vocab: int = VOCAB, layers: int = 2, kv_heads: int = 2, **overrides):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
               initializer_range=0.3, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
               pad_token_id=0)
    cfg.update(overrides)
    return cls(**cfg)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A random model with peaked (non-uniform) next-token distributions, so ties are rare."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # callers say which EOS they want
    return model.eval()


def perturbed(model, scale: float, seed: int = 1):
    """A draft that mostly agrees with ``model``: a copy with Gaussian noise on every weight."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * scale * p.std())
    return draft


def tiny_tokenizer(vocab: int = VOCAB, extra: tuple[str, ...] = ()):
    """A word-level tokenizer: ids 0-2 are <pad>, </s>, <unk>; then words w3, w4, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(3, vocab)] + list(extra)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The reference: the target's own HF ``generate()`` greedy output (new tokens only)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()
