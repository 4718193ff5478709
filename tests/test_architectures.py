"""Every architecture of ``architectures.py`` from a random-weight GGUF file, as llama.cpp's converter
writes one: the native model (its lean forward, the kernels) computes what transformers computes
from the same file, within int8 rounding; fp32 is transformers' own greedy; and speculation is
token-identical to the target alone, on one shard and on two."""

import pytest
import torch
import torch.multiprocessing as mp
from gguf import GGMLQuantizationType as QT
from transformers import AutoModelForCausalLM

from dovetail.models.architectures import ARCHITECTURES
from dovetail.models.cached_lm import CachedLM
from dovetail.models.quantized import load_quantized
from dovetail.models.tree import TreeShape
from dovetail.store import resolve_model
from test_gguf_files import generate
from tiny_models import described, hf_greedy, perturbed, tiny_model, write_gguf

ARCHS = [a.gguf for a in ARCHITECTURES]
MODEL_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
LAYERS = {"gemma3": 6}  # five sliding-window layers (a window of 6 positions), then a full one
FORMATS = {"mlp.down_proj": QT.Q6_K, "lm_head": QT.Q6_K, "embed_tokens": QT.Q4_K,
           "o_proj": QT.Q5_0}  # 128 columns a shard: whole blocks of 32, not of 256
PROMPT = [5, 17, 33, 8, 41, 62, 12, 9, 30, 44, 71, 3, 26]  # longer than the window
SHAPES = [TreeShape.chain(3), TreeShape(8, 4, 2)]


def family_files(tmp_path, arch):
    """Standalone target and draft GGUF files (with their metadata) of architecture ``arch``."""
    target = tiny_model(MODEL_ARCH[arch], seed=2, num_hidden_layers=LAYERS.get(arch, 2), **SHAPE)
    paths = {}
    for role, model in (("target", target), ("draft", perturbed(target, 0.03, seed=3))):
        paths[role] = tmp_path / role / f"tiny-{arch}-{role}.gguf"
        paths[role].parent.mkdir()
        write_gguf(model, paths[role], FORMATS, default=QT.Q4_K, metadata=True)
    return paths


def transformers_model(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_native_forward_is_what_transformers_computes_from_the_file(tmp_path, isolated_home, arch):
    paths = family_files(tmp_path, arch)
    native = load_quantized(resolve_model(str(paths["target"])), "native")
    lm = CachedLM(native)
    assert lm.fast is not None  # the lean forward, not HF's modules
    prefilled = lm.extend(PROMPT, logits_to_keep=0)
    with torch.inference_mode():
        want = transformers_model(paths["target"])(torch.tensor([PROMPT])).logits[0]
    scale = want.abs().max()
    # the same weights; int8 activations and the norms' summation order differ (a wrong tensor
    # fix, rotary table, window or head split would be off by O(1))
    assert (prefilled - want).abs().mean() < 0.02 * scale and (prefilled - want).abs().max() < 0.2 * scale
    assert (prefilled.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75
    single = CachedLM(native)
    decoded = torch.cat([single.extend(PROMPT[i:i + 1]) for i in range(len(PROMPT))])
    assert torch.equal(prefilled, decoded)  # rows are independent of the block, windows included


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_is_transformers_own_greedy_and_native_speculation_is_exact(tmp_path, isolated_home, arch):
    paths = family_files(tmp_path, arch)
    expected = hf_greedy(transformers_model(paths["target"]), PROMPT, 24, eos=1)  # the file's EOS
    assert generate(paths["target"], None, PROMPT, target_precision="fp32") == expected
    alone = generate(paths["target"], None, PROMPT)
    for shape in SHAPES:
        assert generate(paths["target"], paths["draft"], PROMPT, tree=str(shape)) == alone, shape


def _shard_worker(rank, models, draft_folder, init_file, out):
    import torch.distributed as dist

    from dovetail.protocol.collectives import TorchDistributedCollective
    from dovetail.models.tp import load_shard
    from test_greedy_identity import make_engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        draft = load_quantized(draft_folder, "native")
        result = {}
        for precision, model in models.items():
            shard = load_shard(model, TorchDistributedCollective())
            lm = CachedLM(shard)
            logits = lm.extend(PROMPT, logits_to_keep=0)
            runs = [make_engine(shard, d, TreeShape(8, 4, 2)).generate(PROMPT, 24).token_ids
                    for d in (None, draft)]
            result[precision] = (lm.fast is not None, logits.numpy().copy(), runs)
        out.put((rank, result))
    except Exception as err:  # reported at once, not after the parent's timeout
        out.put((rank, repr(err)))
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", ARCHS)
def test_two_shards_compute_the_model_and_speculate_exactly(tmp_path, isolated_home, arch):
    paths = family_files(tmp_path, arch)
    folder, draft_folder = resolve_model(str(paths["target"])), resolve_model(str(paths["draft"]))
    with torch.inference_mode():
        whole = {"native": CachedLM(load_quantized(folder, "native")).extend(PROMPT, logits_to_keep=0),
                 "fp32": transformers_model(paths["target"])(torch.tensor([PROMPT])).logits[0]}
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    models = {precision: described(folder, precision) for precision in ("native", "fp32")}  # as the driver does
    procs = [ctx.Process(target=_shard_worker, args=(r, models, draft_folder, tmp_path / "init", out))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert not any(isinstance(r, str) for r in results.values()), results
    for rank in (0, 1):
        fast, logits, (alone, speculative) = results[rank]["native"]
        assert fast and speculative == alone
        got, want = torch.from_numpy(logits), whole["native"]
        assert (got - want).abs().mean() < 0.01 * want.abs().max()  # partial sums add in another order
        _, logits, (alone, speculative) = results[rank]["fp32"]
        assert speculative == alone
        torch.testing.assert_close(torch.from_numpy(logits), whole["fp32"], atol=1e-4, rtol=1e-4)
    assert results[0]["native"][2] == results[1]["native"][2]
