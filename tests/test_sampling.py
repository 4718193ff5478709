"""Sampling is lossless: speculative samples follow the target's own (warped) distribution."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from dovetail.errors import UserError
from dovetail.models import verification
from dovetail.models.verification import target_probs
from dovetail.sampling import GREEDY_BELOW, SamplingParams
from test_greedy_identity import make_engine
from tiny_models import perturbed, tiny_model

VOCAB = 8
PROMPT = [3, 5, 7]
PARAMS = dict(temperature=0.9, top_p=0.95, top_k=6)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.6)])
def test_warping_matches_hf_warpers(temperature, top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = scores.softmax(-1)
    got = target_probs(logits, SamplingParams(temperature, top_p, top_k))
    torch.testing.assert_close(got, expected)


def hf_kept(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.isfinite(scores)


def vocabulary_rows(vocab: int = 151_936) -> dict[str, torch.Tensor]:
    """Rows as wide as a real vocabulary: a few tokens far above a Gaussian body, the body alone
    (top-p's cut then falls among thousands of tokens), and a body of many exact ties."""
    g = torch.Generator().manual_seed(3)
    body = torch.randn(vocab, generator=g) * 2
    peaked = body.clone()
    peaked[torch.randint(vocab, (8,), generator=g)] += torch.linspace(8, 16, 8)
    tied = torch.randint(0, 40, (vocab,), generator=g).float() / 4  # 40 distinct values
    return {"peaked": peaked, "flat": body, "tied": tied}


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 0.9), (0.8, 40, 1.0), (0.8, 40, 0.9), (1.5, 0, 0.95),
                                                     (0.7, 0, 0.95), (1.0, 5000, 0.5), (1.0, 1, 1.0)])
def test_the_filters_keep_what_hf_keeps_on_a_whole_vocabulary(temperature, top_k, top_p):
    """The native filters find the cut with a histogram, never sorting the row: the same tokens as
    HF's sorting warpers (ties apart: HF splits tokens of equal probability by its sort's order,
    here they stay or go together), probabilities renormalised over them."""
    for shape, logits in vocabulary_rows().items():
        got = target_probs(logits[None], SamplingParams(temperature, top_p, top_k))[0]
        expected = hf_kept(logits[None], temperature, top_k, top_p)[0]
        kept = got > 0
        if shape == "tied":  # a tie straddling the cut: every token of that value stays here
            cut = float(logits[kept].min())
            assert torch.equal(kept & (logits != cut), expected & (logits != cut)), shape
            assert bool(kept[logits == cut].all()) and bool(expected[logits == cut].any()), shape
        else:
            assert torch.equal(kept, expected), shape
        assert abs(float(got.sum(dtype=torch.float64)) - 1) < 1e-5


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (40, 1.0), (40, 0.9), (0, 0.95)])
def test_every_kernel_path_keeps_the_same_tokens(top_k, top_p):
    """The filters find their candidates with the kernel path's range finder (16 tokens a step on
    x86): every path this CPU runs gives the same row, bit for bit, on a whole vocabulary."""
    from dovetail.kernels import ops

    for shape, logits in vocabulary_rows().items():
        probs = (logits / 0.8).softmax(-1)[None].contiguous()
        rows = []
        for isa in range(1, ops().best_isa() + 1):
            row = probs.clone()
            ops().filter_probs_(row, top_k, top_p, isa)
            rows.append(row)
        assert all(torch.equal(row, rows[0]) for row in rows), shape


def test_the_draw_is_the_inverse_cdf_in_token_order():
    """``sample_token`` at a uniform number u is the first token whose running sum (token order,
    float64) passes u x the total; zero-probability tokens are never drawn."""
    probs = torch.rand(151_936, generator=torch.Generator().manual_seed(5)) ** 8
    probs[::3] = 0.0
    probs /= probs.sum()
    cdf = probs.double().cumsum(0).numpy()
    for seed in range(200):
        u = verification.position_uniform(seed, 17)
        token = verification.sample_token(probs, seed, 17)
        assert probs[token] > 0
        expected = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        # a different order of float64 sums may move a number sitting on a boundary by one token
        assert token == expected or abs(cdf[min(token, expected)] - u * cdf[-1]) < 1e-12, (seed, token, expected)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.01), dict(top_k=-1),
                                 dict(temperature=float("nan"))])
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(UserError):
        SamplingParams(**bad)


def exact_joint(target, params, length=3, prompt=PROMPT):
    """The target's exact (warped) distribution over its first ``length`` sampled tokens."""
    probs = {}
    with torch.inference_mode():
        for seq in itertools.product(range(VOCAB), repeat=length - 1):
            logits = target(torch.tensor([prompt + list(seq)])).logits[0, len(prompt) - 1:].float()
            step = target_probs(logits, params).double().numpy()
            prefix_p = np.prod([step[i, seq[i]] for i in range(length - 1)])
            for last in range(VOCAB):
                probs[seq + (last,)] = prefix_p * step[length - 1, last]
    return probs


def sample_counts(engine, params, n, length=3, prompt=PROMPT, seeded=True):
    """``seeded``: seeds 0..n-1 given by the caller (the draft then proposes its top-k); False:
    no seed, so a draft model samples its trees and verification rejects against its q."""
    counts = {}
    for seed in range(n):
        p = SamplingParams(params.temperature, params.top_p, params.top_k, seed=seed if seeded else None)
        out = tuple(engine.generate(prompt, length, p).token_ids)
        counts[out] = counts.get(out, 0) + 1
    return counts


def chi_square_pvalue(counts, probs, n):
    """Goodness of fit on the joint, cells with expected count < 5 pooled into one."""
    keys = sorted(probs, key=probs.get, reverse=True)
    big = [k for k in keys if probs[k] * n >= 5]
    observed = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    expected = [probs[k] * n for k in big] + [n * (1 - sum(probs[k] for k in big))]
    return stats.chisquare(observed, expected).pvalue


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=11, vocab_size=VOCAB, initializer_range=0.5, num_hidden_layers=1,
                        eos_token_id=None)
    return target, perturbed(target, 0.6, seed=12)


@pytest.fixture(scope="module")
def exact(pair):
    return exact_joint(pair[0], SamplingParams(**PARAMS))


N = 2500


@pytest.mark.parametrize("shape", ["chain:3", "6,2,3"])
def test_speculative_samples_match_target_distribution(pair, exact, shape):
    from dovetail.models.tree import TreeShape

    engine = make_engine(*pair, TreeShape.parse(shape), eos=-1)
    counts = sample_counts(engine, SamplingParams(**PARAMS), N)
    assert chi_square_pvalue(counts, exact, N) > 1e-3


def test_broken_sampler_is_detected(pair, exact, monkeypatch):
    """One uniform number reused at every position (positions no longer independent) must fail."""
    from dovetail.models.tree import TreeShape

    original = verification.position_uniform
    monkeypatch.setattr(verification, "position_uniform", lambda seed, position, *stream: original(seed, 0, *stream))
    engine = make_engine(*pair, TreeShape.parse("6,2,3"), eos=-1)
    counts = sample_counts(engine, SamplingParams(**PARAMS), N)
    assert chi_square_pvalue(counts, exact, N) < 1e-6


@pytest.mark.parametrize("shape", ["chain:3", "6,2,3"])
def test_sampled_drafts_match_target_distribution(pair, exact, shape, monkeypatch):
    """Without a caller's seed the draft samples its trees from q and verification rejects
    against q (recursive rejection for siblings): still exactly the target's distribution."""
    from dovetail.models.tree import TreeShape

    drawn = []
    original = verification.DraftSampler.draw
    monkeypatch.setattr(verification.DraftSampler, "draw", lambda self, *a: drawn.append(1) or original(self, *a))
    engine = make_engine(*pair, TreeShape.parse(shape), eos=-1)
    counts = sample_counts(engine, SamplingParams(**PARAMS), N, seeded=False)
    assert drawn, "the draft never sampled"
    assert chi_square_pvalue(counts, exact, N) > 1e-3


def test_a_wrong_q_is_detected(pair, exact, monkeypatch):
    """A draft that samples from q but tells verification another q (flatter than the real one)
    must fail the same test."""
    from dovetail.models.tree import TreeShape

    original = verification.DraftSampler.draw

    def lying_draw(self, log_probs, k):
        scores, tokens, (q_tokens, q_probs) = original(self, log_probs, k)
        flat = np.where(q_probs > 0, 1.0, 0.0).astype(np.float32)
        return scores, tokens, (q_tokens, flat / flat.sum(axis=-1, keepdims=True))

    monkeypatch.setattr(verification.DraftSampler, "draw", lying_draw)
    engine = make_engine(*pair, TreeShape.parse("chain:3"), eos=-1)
    counts = sample_counts(engine, SamplingParams(**PARAMS), N, seeded=False)
    assert chi_square_pvalue(counts, exact, N) < 1e-6


P_ONE = np.array([0.05, 0.1, 0.1, 0.15, 0.3, 0.3])
Q_ONE = np.array([0.4, 0.25, 0.1, 0.1, 0.1, 0.05])


@pytest.mark.parametrize("siblings", [1, 2, 3])
def test_recursive_rejection_over_sampled_siblings_is_exact(siblings):
    """One position, ``siblings`` children drawn from q without replacement: the emitted token
    follows p, and with one child it is accepted with probability sum(min(p, q))."""
    from dovetail.models.tree import DraftTree

    sampler = verification.DraftSampler(SamplingParams(temperature=1.0))
    sampler.generator.manual_seed(siblings)  # the draft's draws too are reproducible: a failure can be rerun
    n, counts, accepted = 6000, np.zeros(len(P_ONE)), 0
    probs = torch.tensor(P_ONE).repeat(siblings + 1, 1)
    for seed in range(n):
        _, tokens, (q_tokens, q_probs) = sampler.draw(torch.tensor(Q_ONE).log()[None], siblings)
        rows = np.zeros((siblings + 1, q_tokens.shape[1]), dtype=np.int64), np.zeros((siblings + 1, q_probs.shape[1]))
        rows[0][0], rows[1][0] = q_tokens[0], q_probs[0]
        tree = DraftTree([0] + tokens[0].tolist(), [-1] + [0] * siblings, *rows)
        result = verification.accept_sampling(tree, probs, seed, 10)
        counts[result.tokens[0]] += 1
        accepted += len(result.path) > 1
    assert stats.chisquare(counts, P_ONE * n).pvalue > 1e-3
    if siblings == 1:
        assert abs(accepted / n - np.minimum(P_ONE, Q_ONE).sum()) < 0.03


def test_sampled_trees_keep_first_draws_and_merging_drops_q(monkeypatch):
    """Pruning fills the budget with, of each node's children, a first run in drawing order; a
    sampled tree merged with another proposer's tree counts as fixed choices (no q)."""
    from dovetail.models.tree import DraftTree, TreeBuilder, TreeShape, merge_trees

    grown_parents = []
    original = TreeBuilder._prune
    monkeypatch.setattr(TreeBuilder, "_prune", lambda self, tokens, parents, *rest: grown_parents.append(parents)
                        or original(self, tokens, parents, *rest))
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3)) * 2
    for _ in range(50):
        sampler = verification.DraftSampler(SamplingParams(temperature=1.0))
        tree, grown = TreeBuilder(TreeShape(7, 3, 3), sampler).build(1, lambda nodes, t, p: logits.expand(len(nodes), -1))
        assert tree.sampled and len(tree) == 7  # 3 + 9 + 9 drawn: the budget is always filled
        for node in range(len(tree)):
            children = tree.children(node)
            if len(children):
                q_tokens, q_probs = tree.proposal(node)
                drawn = [int(t) for t in tree.tokens[children]]
                assert len(set(drawn)) == len(drawn) and set(drawn) <= set(q_tokens[q_probs > 0].tolist())
                # children were grown in drawing order: the kept ones are the first of them
                all_drawn = np.flatnonzero(grown_parents[-1] == grown[node]).tolist()
                assert sorted(int(grown[c]) for c in children) == all_drawn[:len(children)]
    other = DraftTree([1, 5, 6], [-1, 0, 1])
    assert merge_trees([tree, DraftTree([1], [-1])]).sampled
    assert not merge_trees([tree, other]).sampled


@pytest.mark.parametrize("shape", ["chain:1", "chain:4", "6,2,3"])
def test_a_seed_gives_the_same_output_whatever_the_speculation(pair, shape):
    """A position's token depends on the seed and the position only, never on the tree: seeded
    output is the same with any tree and with speculation off."""
    from dovetail.models.tree import TreeShape

    params = SamplingParams(**PARAMS, seed=7)
    alone = make_engine(pair[0], None, TreeShape.chain(1), eos=-1).generate(PROMPT, 20, params).token_ids
    engine = make_engine(*pair, TreeShape.parse(shape), eos=-1)
    result = engine.generate(PROMPT, 20, params)
    assert result.token_ids == alone and sum(result.stats.accepted_per_step) > 0


def test_same_seed_same_output(pair):
    from dovetail.models.tree import TreeShape

    engine = make_engine(*pair, TreeShape.chain(3), eos=-1)
    params = SamplingParams(**PARAMS, seed=123)
    assert engine.generate(PROMPT, 12, params).token_ids == engine.generate(PROMPT, 12, params).token_ids


@pytest.mark.parametrize("temperature", [5e-324, 1e-40, 1e-6])
def test_tiny_temperatures_decode_greedily(pair, temperature):
    """Every temperature the API accepts is numerically safe: below GREEDY_BELOW it is greedy (a
    plain ``logits / T`` overflows to inf and NaN probabilities, and multinomial raises)."""
    from dovetail.models.tree import TreeShape

    params = SamplingParams(temperature, seed=1)
    assert params.greedy
    engine = make_engine(*pair, TreeShape.chain(3), eos=-1)
    assert engine.generate(PROMPT, 12, params).token_ids == engine.generate(PROMPT, 12, SamplingParams()).token_ids


def test_small_temperatures_give_finite_probabilities():
    logits = torch.tensor([[1e4, 0.0, -1e4, 3.0]])
    probs = target_probs(logits, SamplingParams(GREEDY_BELOW))
    assert torch.isfinite(probs).all() and probs[0, 0] == 1.0
