"""A GGUF file as HF files, through transformers' GGUF reader: the config, generation config and
tokenizer a model folder needs beside its file, or the whole model dequantized to fp32 safetensors.
The store (``store.py``) decides when and where; this module is how."""

from __future__ import annotations

from pathlib import Path


def save_gguf_metadata(gguf: Path, out: Path) -> None:
    """Config, generation config and tokenizer of a GGUF file as HF files beside it (no weights)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    kwargs = dict(gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(out)


def save_gguf_as_hf(gguf: Path, out: Path, bar=None) -> None:
    """Load a GGUF with transformers (dequantised) and save a plain fp32 HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    step = bar.update if bar is not None else (lambda n: None)
    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    step(1)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    state = loaded.state_dict()
    step(1)
    # The loaded model carries the GGUF quantization config; a fresh model built from a clean
    # config saves as ordinary fp32 weights that any transformers install can load.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(state, assign=True, strict=False)
    clean.tie_weights()
    del loaded, state
    clean.generation_config = clean.generation_config.__class__.from_model_config(config)
    clean.save_pretrained(out, is_main_process=True)  # whatever torch.distributed says (a shard may convert)
    tokenizer.save_pretrained(out)
    step(1)
