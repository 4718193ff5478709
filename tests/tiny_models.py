"""Tiny random models of every supported architecture, built from configs, for fast exact tests
(no downloads)."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

VOCAB = 96


def tiny_config(arch: str = "llama", vocab: int = VOCAB, layers: int = 2, kv_heads: int = 2, **overrides):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig,
           "phi3": Phi3Config}[arch]
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
               initializer_range=0.3, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
               pad_token_id=0)
    if arch == "qwen3":  # what transformers assumes for a Qwen3 GGUF file (it reads no head size from it)
        cfg["head_dim"] = 128
    if arch == "gemma3":  # a head size of its own, a short window beside full layers, sandwich norms
        cfg.update(head_dim=64, sliding_window=6)
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


def write_gguf_folder(model, tokenizer, out, formats: dict[str, "object"] | None = None, default=None):
    """Save ``model`` as a Dovetail GGUF folder (config + tokenizer + model.gguf), the way llama.cpp's
    converter lays tensors out (its names; Llama q/k rows permuted for its RoPE).

    ``formats`` maps a substring of an HF parameter name to a GGUF block type; other matrices get
    ``default`` (Q8_0), vectors stay F32. Returns {HF name: the dequantized float weight}, the exact
    weights the native model must run with."""
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return write_gguf(model, out / "model.gguf", formats, default)


def write_gguf(model, path, formats: dict[str, "object"] | None = None, default=None, metadata: bool = False,
               edit=None, arch: str | None = None):
    """``model``'s tensors as a GGUF file (see ``write_gguf_folder``). ``metadata``: also the
    hyperparameters and a tokenizer (``gguf_vocabulary``), as llama.cpp's converter writes them,
    so the file stands alone. ``edit(writer)`` may add or change anything before it is written;
    ``arch`` names another GGUF architecture than the model's (for refusal tests)."""
    import gguf
    import numpy as np

    from dovetail.kernels.formats import SCHEMES
    from dovetail.kernels.packing import ENCODABLE, encode, random_blocks

    from dovetail.models.architectures import of_config

    cfg = model.config
    family = of_config(cfg)
    arch = arch or family.gguf
    permuted = arch == "llama" and family.permuted_qk
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.TensorNameMap(arch_id, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    if metadata:
        writer.add_name(f"tiny-{arch}")
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        if getattr(cfg, "layer_types", None) and "sliding_attention" in cfg.layer_types:
            writer.add_sliding_window(cfg.sliding_window)
        tokens, types = gguf_vocabulary(cfg.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_token_merges([])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_pad_token_id(0)
        writer.add_chat_template("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    if edit is not None:
        edit(writer)
    expected = {}
    for name, param in model.state_dict().items():
        w = param.detach().float().numpy()
        key = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if w.ndim == 1:
            stored = w + family.norm_offset if "norm" in name else w  # as llama.cpp's converter stores norms
            writer.add_tensor(key, stored.astype(np.float32))
            expected[name] = w
            continue
        qtype = next((t for part, t in (formats or {}).items() if part in name), default or gguf.GGMLQuantizationType.Q8_0)
        stored = w
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
        part = next((p for p in heads if f"self_attn.{p}" in name), None)
        if permuted and part:  # llama.cpp's permutation of q/k rows
            n = heads[part]
            stored = w.reshape(n, 2, w.shape[0] // n // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        if qtype not in ENCODABLE:  # a format Dovetail does not encode: random blocks (the weights change)
            raw = random_blocks(qtype, *w.shape, seed=len(expected))
            writer.add_tensor(key, raw, raw_dtype=qtype)
            if qtype not in SCHEMES:  # nor run: the file is for refusal tests
                continue
        else:
            raw = encode(stored, qtype)
            writer.add_tensor(key, raw, raw_dtype=qtype)
        deq = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
        if permuted and part:  # undo the permutation: HF's row order
            n = heads[part]
            deq = deq.reshape(n, w.shape[0] // n // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        expected[name] = deq
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def gguf_vocabulary(vocab: int) -> tuple[list[str], list[int]]:
    """A byte-level BPE vocabulary with no merges: <pad>, </s>, <unk> (control tokens), then single
    printable characters (one byte each), so every id is a token and text round-trips."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(0xA1, 0xAC)]
    tokens = ["<pad>", "</s>", "<unk>"] + chars[:vocab - 3]
    if len(tokens) < vocab:
        raise ValueError(f"at most {len(chars) + 3} tokens, asked {vocab}")
    return tokens, [3, 3, 2] + [1] * (vocab - 3)


def dequantized_copy(model, weights: dict):
    """A float copy of ``model`` carrying ``weights`` (e.g. ``write_gguf_folder``'s result)."""
    import copy

    import torch

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in ref.state_dict().items():
            param.copy_(torch.from_numpy(weights[name]))
    return ref


def described(folder, precision: str = "auto", role: str = "target", eos=None, context_length: int | None = None):
    """``describe.describe_model`` of ``folder``, its EOS ids and context set where a test pins them."""
    from dataclasses import replace

    from dovetail.describe import describe_model

    spec = describe_model(folder, precision, role)
    return replace(spec, eos_token_ids=spec.eos_token_ids if eos is None else tuple(eos),
                   context_length=context_length or spec.context_length)


def actor_engine(target_dir, draft_dir, config, eos, context_length: int = 512, **options):
    """An ``ActorEngine`` for folders as a test names them: a draft model or a feature drafter."""
    from dovetail.actors.system import ActorEngine
    from dovetail.models.spec import is_drafter_dir

    drafter = draft_dir is not None and is_drafter_dir(draft_dir)
    draft = described(draft_dir, config.draft_precision, "draft") if draft_dir is not None and not drafter else None
    return ActorEngine(described(target_dir, config.target_precision, eos=eos, context_length=context_length), draft,
                       config, drafter_dir=draft_dir if drafter else None, **options)
