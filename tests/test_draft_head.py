"""A cheaper draft. Its LM head cut to its most frequent tokens (models/draft_head.py): the kept
tokens' logits are the whole head's, bit for bit, every other token is never proposed, and the
output stays the target's own, greedy and sampled. Its wider blocks re-encoded to 4 bits at load
(precision q4): fewer bytes, the same output."""

import json

import numpy as np
import pytest
import torch

from dovetail.config import EngineConfig
from dovetail.errors import UserError
from dovetail.models.cached_lm import CachedLM
from dovetail.models.draft_head import CutHead, read_cut
from dovetail.models.drafter_net import top_ids
from dovetail.training.vocab import count_tokens, ensure_cut
from dovetail.models.quantized import QuantLinear, load_quantized
from dovetail.models.tree import TreeShape
from dovetail.sampling import SamplingParams
from test_greedy_identity import accepted, make_engine, prompt, speculation_equals_alone
from test_quantized import gguf_model
from tiny_models import perturbed, tiny_model, tiny_tokenizer


def test_the_cut_keeps_eos_then_the_most_counted_then_the_lowest_ids():
    counts = np.array([0, 5, 0, 9, 0, 1, 0, 0, 0, 0])
    ids = top_ids(counts, 5, always=[8])
    assert ids.tolist() == [0, 1, 3, 5, 8]  # 8 always; 3 (9), 1 (5), 5 (1) counted; then the lowest, 0
    assert top_ids(counts, 2, always=[8]).tolist() == [3, 8]
    assert top_ids(counts, 20).tolist() == list(range(10))  # more than the vocabulary: all of it


@pytest.mark.parametrize("tied", [True, False])
def test_a_cut_head_gives_the_whole_heads_logits_on_its_tokens(tmp_path, tied):
    _, folder, _ = gguf_model(tmp_path, "qwen2", seed=6, tie_word_embeddings=tied)
    ids = np.array([0, 3, 4, 10, 17, 31, 40, 63])
    whole, cut = load_quantized(folder, "native"), load_quantized(folder, "native", head_ids=ids)
    assert isinstance(cut.lm_head, CutHead) and cut.lm_head.kept.out_features == len(ids)
    p = prompt(9, 2)
    a, b = CachedLM(whole).extend(p, logits_to_keep=0), CachedLM(cut).extend(p, logits_to_keep=0)
    assert b.shape == a.shape
    assert torch.equal(b[:, ids], a[:, ids])
    outside = np.setdiff1d(np.arange(a.shape[1]), ids)
    assert torch.all(b[:, outside] == -float("inf"))


def test_greedy_output_with_a_cut_draft_head_is_the_target_alone(tmp_path):
    model, folder, _ = gguf_model(tmp_path, "qwen2", seed=4)
    target = load_quantized(folder, "native")
    perturbed(model, 0.05, seed=9).save_pretrained(tmp_path / "draft")
    # the cut keeps half the vocabulary: the target's own choices often fall outside it
    draft = load_quantized(tmp_path / "draft", "int4", head_ids=np.arange(0, 64, 2))
    results = speculation_equals_alone(target, draft, TreeShape.parse("6,3,2"), [prompt(n, n) for n in (1, 7, 23)])
    outside = any(t % 2 for r in results for t in r.token_ids)
    assert any(map(accepted, results)) and outside, "neither acceptance nor a token outside the cut was exercised"


def test_sampling_with_a_cut_draft_head_matches_the_targets_distribution(tmp_path):
    """The draft samples from q renormalised over its cut; verification's rejection rule takes that
    q, so the joint of 3 sampled tokens still fits the target's exact distribution (chi-square;
    the target is test_sampling's fp32 one, whose exact joint comes from the very forward the
    engine runs: top-p's edge would turn a quantized forward's last-bit differences into cells)."""
    from test_sampling import PARAMS, chi_square_pvalue, exact_joint, sample_counts

    target = tiny_model("llama", seed=11, vocab_size=8, initializer_range=0.5, num_hidden_layers=1, eos_token_id=None)
    perturbed(target, 0.6, seed=12).save_pretrained(tmp_path / "draft")
    draft = load_quantized(tmp_path / "draft", "int4", head_ids=np.array([0, 2, 3, 5, 6]))
    params = SamplingParams(**PARAMS)
    engine = make_engine(target, draft, TreeShape.parse("6,2,3"), eos=-1)
    n = 2500
    assert chi_square_pvalue(sample_counts(engine, params, n, seeded=False), exact_joint(target, params), n) > 1e-3


def test_the_cut_is_counted_once_and_kept_beside_the_model(tmp_path, monkeypatch):
    import dovetail.training.vocab as vocab

    monkeypatch.setattr(vocab, "CODE_TOKENS", 2000)
    tiny_tokenizer().save_pretrained(tmp_path)  # the draft's folder holds its tokenizer
    calls = []
    real = vocab.count_tokens
    monkeypatch.setattr(vocab, "count_tokens", lambda *a: calls.append(a) or real(*a))
    path = ensure_cut(tmp_path, 64, 16, [1])
    assert path.parent == tmp_path and path.name.startswith("draft-head-16-")
    record = json.loads(path.read_text())
    assert record["tokens"] == 16 and len(record["ids"]) == 16 and 1 in record["ids"]
    assert record["sources"]  # the text it came from, and how much of it
    assert ensure_cut(tmp_path, 64, 16, [1]) == path and len(calls) == 1
    assert read_cut(path).tolist() == sorted(record["ids"])


def test_counting_reads_the_shipped_answers_and_python_source(monkeypatch):
    import dovetail.training.vocab as vocab

    monkeypatch.setattr(vocab, "CODE_TOKENS", 1000)

    counts, sources = count_tokens(tiny_tokenizer(), 64, "no-such-target")
    assert list(sources) == ["Python standard library"] and counts.sum() == sources["Python standard library"]


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("0", 0), (16384, 16384), ("32768", 32768)])
def test_draft_vocab_takes_auto_or_a_number(value, expected):
    assert EngineConfig(draft=None, draft_vocab=value).draft_vocab == expected


@pytest.mark.parametrize("value", [-1, "many", "1.5"])
def test_a_bad_draft_vocab_is_refused_by_name(value):
    with pytest.raises(UserError, match="draft_vocab"):
        EngineConfig(draft=None, draft_vocab=value)


def test_a_q4_draft_re_encodes_its_wider_blocks_and_keeps_the_output(tmp_path, isolated_home):
    """``q4``: matrices wider than 4 bits (here Q6_K, Q5_0, Q8_0) are re-encoded to Q4_K or Q4_0,
    4-bit ones and the embedding keep their blocks; the weights stay close to the file's, and
    the target's output is unchanged with it as the draft."""
    from test_quantized import FORMATS

    model, folder, _ = gguf_model(tmp_path, "qwen2", seed=8, tie_word_embeddings=False)
    native, light = load_quantized(folder, "native"), load_quantized(folder, "q4")
    kinds = {name: (m.qtype.name, getattr(light.get_submodule(name), "qtype").name)
             for name, m in native.named_modules() if isinstance(m, QuantLinear)}
    assert kinds["model.layers.0.mlp.down_proj"] == ("Q6_K", "Q4_K")  # 768 inputs: 3 super-blocks
    assert kinds["model.layers.0.self_attn.v_proj"] == ("Q5_0", "Q4_K")
    assert kinds["model.layers.0.self_attn.q_proj"] == ("Q8_0", "Q4_K")  # the writer's default
    assert kinds["model.layers.0.mlp.gate_proj"] == ("Q4_K", "Q4_K")
    assert native.model.embed_tokens.table.qtype == light.model.embed_tokens.table.qtype
    assert sum(m.nbytes for m in light.modules() if isinstance(m, QuantLinear)) < \
        sum(m.nbytes for m in native.modules() if isinstance(m, QuantLinear))
    a, b = native.lm_head.dequantize(), light.lm_head.dequantize()
    assert (a - b).abs().max() < 0.2 * a.abs().max()  # 4-bit rounding of the same weights
    results = speculation_equals_alone(native, light, TreeShape.parse("6,3,2"), [prompt(n, n + 1) for n in (3, 17)], 30)
    assert all(map(accepted, results))


def test_q4_blocks_are_made_once_and_read_back(tmp_path, isolated_home, monkeypatch):
    """The re-encoded blocks are kept on disk: a second load encodes nothing and packs the same
    weights; a changed file gets a folder of its own."""
    from dovetail.models import weight_sources

    _, folder, _ = gguf_model(tmp_path, "qwen2", seed=8, tie_word_embeddings=False)
    first = load_quantized(folder, "q4")
    cache = weight_sources.reencoded_cache(weight_sources.gguf_file(folder))
    kept = sorted(p.name for p in cache.glob("*.npy"))
    assert "model.layers.0.mlp.down_proj.weight.Q4_K.npy" in kept and not list(cache.glob("*.partial"))

    def no_encoding(*args, **kwargs):
        raise AssertionError("re-encoded although the blocks were kept")

    monkeypatch.setattr(weight_sources, "encode", no_encoding)
    second = load_quantized(folder, "q4")
    for name, m in first.named_modules():
        if isinstance(m, QuantLinear):
            other = second.get_submodule(name)
            assert all(torch.equal(getattr(m, b), getattr(other, b)) for b in ("q", "D"))
    gguf = weight_sources.gguf_file(folder)
    gguf.write_bytes(gguf.read_bytes())  # the same bytes, a new modification time
    assert weight_sources.reencoded_cache(gguf) != cache


def test_q4_needs_a_gguf_file(tmp_path):
    from dovetail.models.precision import resolve_precision

    tiny_model("llama", seed=1).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="'q4' needs a GGUF model"):
        resolve_precision("q4", tmp_path / "hf", "int8")
