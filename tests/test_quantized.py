"""Native quantized execution: every block format unpacks bit-exactly, every kernel path this CPU
runs computes the same numbers, and speculative decoding on a quantized target is token-identical
to that target's own plain decoding."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from dovetail.errors import UserError
from dovetail.kernels import ops
from dovetail.kernels.formats import SUPPORTED
from dovetail.kernels.packing import ENCODABLE, decode, encode, pack, precision_format, random_blocks
from dovetail.models.cached_lm import CachedLM
from dovetail.models.precision import resolve_precision
from dovetail.models.quantized import QuantEmbedding, QuantLinear, load_quantized
from dovetail.models.tree import TreeShape
from test_greedy_identity import accepted, make_engine, prompt, speculation_equals_alone
from tiny_models import dequantized_copy, perturbed, tiny_model, tiny_tokenizer, write_gguf_folder

PATHS = list(range(1, ops().best_isa() + 1))  # 1 scalar, 2 AVX2, 3 AVX-512 VNNI: those this CPU runs
K_QUANTS = (QT.Q4_K, QT.Q6_K, QT.Q5_K, QT.Q3_K, QT.Q2_K)


def packed_weight(qtype, rows, cols, seed=0):
    """(float weights, GGUF blocks, packed): rounded from Gaussian weights where Dovetail encodes
    the format, else random blocks (their dequantisation is then the float weights)."""
    if qtype not in ENCODABLE:
        raw = random_blocks(qtype, rows, cols, seed)
        return quants.dequantize(raw, qtype).reshape(rows, cols), raw, pack(decode(raw, qtype, rows, cols))
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    w[:, :7] *= 8  # an outlier column: scales must differ a lot between groups
    raw = encode(w, qtype)
    return w, raw, pack(decode(raw, qtype, rows, cols))


def run(x, pw, isa):
    return ops().qmatmul(x, *pw.args(), *pw.scheme_args(), isa)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_unpacking_is_bit_exact_against_gguf_dequantize(qtype):
    rows, cols = 37, (512 if qtype in K_QUANTS else 96)  # rows not a multiple of the 16-row tile
    _, raw, pw = packed_weight(qtype, rows, cols)
    reference = quants.dequantize(raw, qtype).reshape(rows, cols)
    got = ops().dequantize_rows(*pw.args(), cols, *pw.scheme_args(), torch.arange(rows)).numpy()
    assert np.array_equal(got, reference)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_every_kernel_path_matches_a_float64_reference(qtype):
    rows, cols = 45, (768 if qtype in K_QUANTS else 160)
    w, raw, pw = packed_weight(qtype, rows, cols, seed=1)
    deq = torch.from_numpy(quants.dequantize(raw, qtype).reshape(rows, cols)).double()
    for m in (1, 2, 3, 4, 5, 8, 13, 16, 31, 32):
        x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)) * 3
        xq, xs = ops().quantize_rows(x)
        x_deq = (xq.double().view(m, -1, 32) * xs[..., 0:1].double()).view(m, cols)  # the int8 activations
        exact = x_deq @ deq.T  # what the kernel computes, in float64
        outs = [run(x, pw, isa) for isa in PATHS]
        for out in outs[1:]:
            assert torch.equal(out, outs[0]), "kernel paths disagree"
        scale = exact.abs().max()
        assert (outs[0].double() - exact).abs().max() <= 1e-5 * scale * cols ** 0.5
        # and against the unquantized activations: the int8 rounding is small
        assert (outs[0].double() - x.double() @ deq.T).abs().max() <= 0.05 * scale


def test_each_row_is_computed_independently_of_the_block():
    """A token's outputs are bit-identical alone, in a block or in a batch: greedy identity rests on it."""
    _, _, pw = packed_weight(QT.Q4_K, 64, 512, seed=2)
    x = torch.randn(32, 512)
    block = run(x, pw, 0)
    for i in (0, 5, 31):
        assert torch.equal(run(x[i:i + 1], pw, 0)[0], block[i])
    assert torch.equal(run(x[3:11], pw, 0), block[3:11])
    # a long prompt's rows go in passes that fit a core's L2 (64 rows at a time for 4,352 inputs):
    # rows in the last, partial pass and alone match, on every path
    _, _, wide = packed_weight(QT.Q6_K, 20, 4352, seed=3)
    x = torch.randn(150, 4352)
    blocks = [run(x, wide, isa) for isa in PATHS]
    assert all(torch.equal(b, blocks[0]) for b in blocks[1:])
    for i in (0, 63, 64, 149):
        assert torch.equal(run(x[i:i + 1], wide, 0)[0], blocks[0][i])


def test_activation_quantization_is_the_same_on_every_path():
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(4)) * 5
    x[3, :32] = 0.0  # an all-zero block
    x[5, 7] = 1e30  # one huge value: the rest of its block rounds to zero
    x[6, :32] = torch.arange(32) - 15.5  # exact halves: round half to even on every path
    results = [ops().quantize_rows(x, isa) for isa in PATHS]
    for xq, xs in results[1:]:
        assert torch.equal(xq, results[0][0]) and torch.equal(xs, results[0][1])


def test_activation_quantization_per_block():
    x = torch.tensor([[1.0] * 31 + [-127.0]])
    xq, xs = ops().quantize_rows(x)
    assert xq[0, -1].item() == -127 and xq[0, 0].item() == 1
    assert xs[0, 0, 0].item() == pytest.approx(1.0)  # dx = amax / 127
    assert xs[0, 0, 1].item() == pytest.approx(31 - 127)
    zeros_q, zeros_s = ops().quantize_rows(torch.zeros(2, 64))
    assert not zeros_q.any() and not zeros_s.any()


def test_bad_shapes_and_paths_are_refused():
    _, _, pw = packed_weight(QT.Q8_0, 16, 64)
    with pytest.raises(RuntimeError):
        ops().qmatmul(torch.randn(2, 96), *pw.args(), *pw.scheme_args(), 0)  # K does not match
    with pytest.raises(RuntimeError):
        ops().qmatmul(torch.randn(2, 64), *pw.args(), *pw.scheme_args(), 9)
    with pytest.raises(ValueError):
        encode(np.zeros((2, 100), np.float32), QT.Q4_K)
    assert precision_format("int4", 512) == QT.Q4_K and precision_format("int4", 96) == QT.Q4_0
    assert precision_format("int8", 96) == QT.Q8_0


# -- models ---------------------------------------------------------------------------------------
FORMATS = {"mlp.down_proj": QT.Q6_K, "v_proj": QT.Q5_0, "lm_head": QT.Q6_K, "embed_tokens": QT.Q4_K,
           "mlp": QT.Q4_K, "o_proj": QT.Q4_0}


def gguf_model(tmp_path, arch="qwen2", seed=0, **overrides):
    """A tiny model written as a GGUF folder with a Q4_K_M-like mix of formats (hidden 256)."""
    cfg = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2)
    cfg.update(overrides)
    model = tiny_model(arch, seed=seed, **cfg)
    folder = tmp_path / f"{arch}-{seed}"
    weights = write_gguf_folder(model, tiny_tokenizer(), folder, FORMATS)
    return model, folder, weights


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_native_model_runs_exactly_the_gguf_weights(tmp_path, arch):
    model, folder, weights = gguf_model(tmp_path, arch)
    native = load_quantized(folder, "native")
    for name, module in native.named_modules():
        if isinstance(module, QuantLinear) and name in dict(model.named_modules()):
            assert torch.equal(module.dequantize(), torch.from_numpy(weights[f"{name}.weight"])), name
    assert isinstance(native.model.embed_tokens, QuantEmbedding)
    ids = torch.tensor([[5, 17, 33, 2, 90]])
    assert torch.equal(native.model.embed_tokens(ids)[0], torch.from_numpy(weights["model.embed_tokens.weight"])[ids[0]])
    reference = dequantized_copy(model, weights)  # same weights, float activations
    with torch.inference_mode():
        got, want = native(ids).logits, reference(ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # only the int8 activations differ
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_lean_forward_computes_the_hf_model(tmp_path, arch):
    """Quantized models decode through ``fast_forward`` (their own cache, fused per-row operators);
    it must compute the same model as HF's forward of the same modules, not merely agree with itself."""
    _, folder, _ = gguf_model(tmp_path, arch, seed=5)
    native = load_quantized(folder, "native")
    lm = CachedLM(native)
    assert lm.fast is not None
    ids = [5, 17, 33, 2, 90, 41, 7, 60]
    lean = torch.cat([lm.extend(ids[:5], logits_to_keep=0), lm.extend(ids[5:], logits_to_keep=0)])
    with torch.inference_mode():
        hf = native(torch.tensor([ids])).logits[0]
    # the same weights and int8 activations; only the norms' summation order differs, which can
    # flip an occasional int8 rounding (a wrong rotary, head grouping or cache would be off by O(1))
    scale = hf.abs().max()
    assert (lean - hf).abs().mean() < 1e-3 * scale and (lean - hf).abs().max() < 0.02 * scale
    assert (lean.argmax(-1) == hf.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_float_checkpoint_is_quantized_on_load(tmp_path, precision):
    model = tiny_model("qwen2", seed=3, hidden_size=256, intermediate_size=512)
    model.save_pretrained(tmp_path / "float")
    quantized = load_quantized(tmp_path / "float", precision)
    linears = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    assert linears and {m.qtype for m in linears} == {QT.Q8_0 if precision == "int8" else QT.Q4_K}
    error = (quantized.model.layers[0].mlp.up_proj.dequantize() - model.model.layers[0].mlp.up_proj.weight).abs()
    assert error.mean() < (0.01 if precision == "int8" else 0.1) * model.model.layers[0].mlp.up_proj.weight.abs().mean()


def test_precision_resolution(tmp_path, tiny_model_dirs):
    _, folder, _ = gguf_model(tmp_path)
    assert resolve_precision("auto", folder, "fp32") == "native"
    assert resolve_precision("auto", tiny_model_dirs["target"], "fp32") == "fp32"
    assert resolve_precision("auto", tiny_model_dirs["draft"], "int8") == "int8"
    with pytest.raises(UserError, match="native"):
        resolve_precision("native", tiny_model_dirs["target"], "fp32")
    with pytest.raises(UserError):
        resolve_precision("int3", folder, "fp32")


SHAPES = [TreeShape.chain(1), TreeShape.chain(4), TreeShape(8, 4, 2), TreeShape(16, 5, 4)]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_speculative_greedy_identical_to_the_quantized_target_alone(tmp_path, arch, shape):
    model, folder, _ = gguf_model(tmp_path, arch, seed=4)
    target = load_quantized(folder, "native")
    draft_model = perturbed(model, 0.05, seed=9)
    draft_model.save_pretrained(tmp_path / "draft")
    draft = load_quantized(tmp_path / "draft", "int4")  # the draft through the same kernels
    results = speculation_equals_alone(target, draft, shape, [prompt(n, n) for n in (1, 7, 23)])
    assert any(map(accepted, results)), "no draft token was ever accepted: acceptance went untested"


def test_a_prompt_prefilled_in_one_block_is_decoding_it_token_by_token(tmp_path):
    """Prefill (one forward over the whole prompt: the kernels' row blocks and passes) gives the
    bits that decoding the prompt one token at a time gives, at every position, and leaves a cache
    from which the next token's logits are the same: so plain decoding and speculation, which both
    prefill through it, start from the same prompt cache whatever the prompt's length."""
    _, folder, _ = gguf_model(tmp_path, seed=3)
    target = load_quantized(folder, "native")
    p = prompt(150, 11)  # more rows than one kernel block of 64
    block, single = CachedLM(target), CachedLM(target)
    prefilled = block.extend(p, logits_to_keep=0)
    decoded = torch.cat([single.extend(p[i:i + 1]) for i in range(len(p))])
    assert torch.equal(prefilled, decoded)
    assert torch.equal(block.extend([5]), single.extend([5]))


def test_batched_verification_matches_single_requests(tmp_path):
    from dovetail.models.cached_lm import forward_trees
    from dovetail.models.tree import DraftTree

    _, folder, _ = gguf_model(tmp_path, seed=5)
    target = load_quantized(folder, "native")
    lms = [CachedLM(target) for _ in range(3)]
    prompts = [prompt(n, n) for n in (3, 9, 14)]
    trees = [DraftTree(np.array([7, 8, 9, 10]), np.array([-1, 0, 0, 1])) for _ in prompts]
    alone = []
    for p, tree in zip(prompts, trees):
        lm = CachedLM(target)
        lm.extend(p)
        alone.append(lm.forward_tree(tree.tokens, tree.parents, range(len(tree)), lm.committed))
    for lm, p in zip(lms, prompts):
        lm.extend(p)
    together = forward_trees(lms, trees)
    for a, b in zip(alone, together):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_sampling_with_a_quantized_target_matches_its_distribution(tmp_path):
    """Lossless sampling holds for a quantized target: the joint of 3 sampled tokens fits the
    quantized target's own exact distribution (chi-square)."""
    from dovetail.sampling import SamplingParams
    from test_sampling import PARAMS, chi_square_pvalue, exact_joint, sample_counts

    model = tiny_model("llama", seed=11, vocab_size=8, initializer_range=0.5, num_hidden_layers=1, eos_token_id=None)
    model.save_pretrained(tmp_path / "target")
    target = load_quantized(tmp_path / "target", "int4")
    params = SamplingParams(**PARAMS)
    exact = exact_joint(target, params)
    engine = make_engine(target, perturbed(model, 0.6, seed=12), TreeShape.parse("6,2,3"), eos=-1)
    n = 2500
    assert chi_square_pvalue(sample_counts(engine, params, n), exact, n) > 1e-3


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_the_memory_plan_counts_the_packed_bytes_of_every_format(qtype):
    """The plan's estimate (``packed_bytes``) is what packing allocates, rows padded to a tile:
    Q3_K and Q2_K take more than their file, so the file's size would under-count them."""
    from dovetail.kernels.packing import packed_bytes

    _, raw, pw = packed_weight(qtype, 37, 512)
    assert packed_bytes(qtype, 37, 512) == pw.nbytes
    if qtype in (QT.Q3_K, QT.Q2_K):
        assert pw.nbytes > 1.3 * raw.nbytes
