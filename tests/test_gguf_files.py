"""A user's own GGUF file runs by its path (or a folder holding it): config, tokenizer and chat
template come from the file's metadata, the weights are never copied, and a file Dovetail cannot
run exactly is refused in one line (exit 2) instead of becoming a silent float layer."""

import shutil

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from dovetail.api import Dovetail
from dovetail.cli import main
from dovetail.config import EngineConfig
from dovetail.kernels.formats import SUPPORTED
from dovetail.models.quantized import load_quantized
from dovetail.store import ModelStore, resolve_model
from test_cli import _one_line_error
from tiny_models import hf_greedy, perturbed, tiny_model, write_gguf

FORMATS = {"mlp.down_proj": QT.Q6_K, "lm_head": QT.Q6_K, "embed_tokens": QT.Q4_K}
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def gguf_pair(tmp_path):
    """A target and a draft, each one standalone GGUF file with its metadata, in folders of their own."""
    target = tiny_model("qwen2", seed=2, **SHAPE)
    draft = perturbed(target, 0.05, seed=3)
    paths = {}
    for role, model in (("target", target), ("draft", draft)):
        (tmp_path / role).mkdir()
        paths[role] = tmp_path / role / f"Tiny-{role}-Q4_K_M.gguf"
        write_gguf(model, paths[role], FORMATS, default=QT.Q4_K, metadata=True)
    return target, paths


def generate(target, draft, prompt, **kw):
    config = EngineConfig(target=str(target), draft=None if draft is None else str(draft), engine="inprocess",
                          threads=1, **kw)
    with Dovetail(config, verbose=False) as dt:
        return dt.engine.generate(prompt, 24).token_ids


PROMPT = [5, 17, 33, 8, 41, 62, 12]


def test_a_gguf_file_runs_by_path_natively_and_speculation_is_exact(tmp_path, isolated_home):
    _, paths = gguf_pair(tmp_path)
    folder = resolve_model(str(paths["target"]))
    assert folder.parent == isolated_home / "local"
    assert (folder / "model.gguf").resolve() == paths["target"].resolve()  # a link: nothing copied
    assert sum(f.stat().st_size for f in folder.iterdir() if not f.is_symlink()) < 100_000
    assert resolve_model(str(paths["target"].parent)) == folder  # the folder holding it: the same model
    alone = generate(paths["target"], None, PROMPT)
    dt = Dovetail(EngineConfig(target=str(paths["target"]), draft=None, engine="inprocess"), verbose=False)
    assert dt.target_precision == "native"
    assert dt.tokenizer.decode(dt.tokenizer.encode("abc")) == "abc"  # the file's own vocabulary
    assert generate(paths["target"], paths["draft"].parent, PROMPT) == alone
    assert generate(paths["target"], paths["draft"], PROMPT, tree="chain:3") == alone


MIXES = {  # the K-quant files people hold, roughly as llama.cpp's presets lay them out
    "Q5_K_M": ({"mlp.down_proj": QT.Q6_K, "lm_head": QT.Q6_K}, QT.Q5_K),
    "Q3_K_M": ({"mlp.down_proj": QT.Q5_K, "self_attn.v_proj": QT.Q5_K, "lm_head": QT.Q6_K}, QT.Q3_K),
    "Q2_K": ({"mlp.down_proj": QT.Q3_K, "lm_head": QT.Q6_K, "embed_tokens": QT.Q4_K}, QT.Q2_K),
}


@pytest.mark.parametrize("mix", MIXES)
def test_k_quant_files_run_natively_and_speculation_is_exact(tmp_path, isolated_home, mix):
    formats, default = MIXES[mix]
    target = tiny_model("qwen2", seed=2, **SHAPE)
    paths = {}
    for role, model in (("target", target), ("draft", perturbed(target, 0.05, seed=3))):
        paths[role] = tmp_path / f"{role}-{mix}.gguf"
        write_gguf(model, paths[role], formats, default=default, metadata=True)
    alone = generate(paths["target"], None, PROMPT)
    assert generate(paths["target"], paths["draft"], PROMPT, tree="chain:3") == alone
    assert generate(paths["target"], paths["draft"], PROMPT, tree="8,4,2") == alone


def test_fp32_from_a_gguf_file_is_hf_transformers_own_greedy(tmp_path, isolated_home):
    from transformers import AutoModelForCausalLM

    _, paths = gguf_pair(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(paths["target"].parent, gguf_file=paths["target"].name,
                                              dtype=torch.float32).eval()
    expected = hf_greedy(hf, PROMPT, 24)
    assert generate(paths["target"], None, PROMPT, target_precision="fp32") == expected


def test_a_changed_file_is_read_again_and_a_moved_one_is_listed_missing(tmp_path, isolated_home, capsys):
    _, paths = gguf_pair(tmp_path)
    store = ModelStore(progress=False)
    folder = store.open_local(paths["target"])
    marker = (folder / "dovetail-model.json").read_text()
    write_gguf(tiny_model("qwen2", seed=5, **SHAPE), paths["target"], FORMATS, default=QT.Q4_K, metadata=True)
    assert store.open_local(paths["target"]) == folder
    assert (folder / "dovetail-model.json").read_text() != marker  # the new size or time was seen
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "Tiny-target-Q4_K_M" in out and "qwen2, Q4_K+Q6_K" in out and "native" in out
    moved = tmp_path / "elsewhere.gguf"
    shutil.move(paths["target"], moved)
    assert main(["models"]) == 0
    assert f"{paths['target']} (missing)" in capsys.readouterr().out
    assert main(["models", str(moved)]) == 0
    assert "elsewhere" in capsys.readouterr().out


def _bad(tmp_path, kind):
    model = tiny_model("qwen2", seed=2, **SHAPE)
    path = tmp_path / f"{kind}.gguf"
    if kind == "not-gguf":
        path.write_text("hello")
    elif kind == "truncated":
        write_gguf(model, path, FORMATS, default=QT.Q4_K, metadata=True)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) - 4096])
    elif kind == "unsupported":
        write_gguf(model, path, {**FORMATS, "mlp.up_proj": QT.IQ4_NL}, default=QT.Q4_K, metadata=True)
    elif kind == "contradiction":
        write_gguf(tiny_model("qwen2", seed=2, **{**SHAPE, "num_hidden_layers": 1}), path, FORMATS,
                   default=QT.Q4_K, metadata=True, edit=lambda w: w.add_uint32("qwen2.block_count", 2))
    return path


def test_a_partial_rotary_is_refused_not_run_wrong(tmp_path, isolated_home, capsys):
    """Phi-4-mini's files rotate part of each head; transformers' GGUF reader drops that, so the
    file would run wrong: refused in one line instead."""
    path = tmp_path / "phi4-like.gguf"
    write_gguf(tiny_model("phi3", seed=2, **SHAPE), path, FORMATS, default=QT.Q4_K, metadata=True,
               edit=lambda w: w.add_rope_dimension_count(48))
    code = main(["generate", "--target", str(path), "--no-draft", "--prompt", "abc", "--engine", "inprocess"])
    assert code == 2
    assert "covers 48 of each head's 64 dimensions" in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("kind,message", [
    ("not-gguf", "not a readable GGUF file"),
    ("truncated", "truncated: tensor"),
    ("unsupported", "is IQ4_NL, a block format the native kernels do not run"),
    ("contradiction", "declares 2 layers"),
])
def test_a_bad_file_is_refused_in_one_line(tmp_path, isolated_home, capsys, kind, message):
    path = _bad(tmp_path, kind)
    code = main(["generate", "--target", str(path), "--no-draft", "--prompt", "abc", "--engine", "inprocess"])
    _, err = capsys.readouterr()
    assert code == 2
    assert message in _one_line_error(err)


def test_no_layer_is_ever_a_silent_float_layer(tmp_path, isolated_home):
    """Every matrix of a file in the supported formats runs through the kernels; a format they do
    not run is refused at load even when the precision check is bypassed."""
    from dovetail.errors import UserError
    from dovetail.models.quantized import QuantEmbedding, QuantLinear

    for qtype in SUPPORTED:
        path = tmp_path / f"{qtype.name}.gguf"
        write_gguf(tiny_model("llama", seed=1, **SHAPE), path, {}, default=qtype, metadata=True)
        model = load_quantized(resolve_model(str(path)), "native")
        linears = [m for n, m in model.named_modules() if n.endswith("_proj") or n == "lm_head"]
        assert len(linears) == 2 * 7 + 1 and all(isinstance(m, QuantLinear) for m in linears), qtype
        assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
        assert {m.qtype for m in linears} == {qtype}
    bad = resolve_model(str(_bad(tmp_path, "unsupported")))
    with pytest.raises(UserError, match="IQ4_NL"):
        load_quantized(bad, "native")


@pytest.mark.parametrize("arch", ["minicpm", "stablelm"])
def test_an_architecture_not_yet_native_is_refused_natively_by_name(tmp_path, arch):
    from dovetail.errors import UserError
    from dovetail.models.precision import resolve_precision

    (tmp_path / "m").mkdir()
    write_gguf(tiny_model("qwen2", seed=2, **SHAPE), tmp_path / "m" / "model.gguf", FORMATS, default=QT.Q4_K, arch=arch)
    with pytest.raises(UserError, match=f"architecture '{arch}' does not run natively yet"):
        resolve_precision("auto", tmp_path / "m", "fp32")
    assert resolve_precision("fp32", tmp_path / "m", "fp32") == "fp32"
