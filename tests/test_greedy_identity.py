"""Greedy speculative output is token-identical to the target's own HF generate()."""

import pytest
import torch

from dovetail.engine import SpeculativeEngine
from dovetail.models.cached_lm import CachedLM
from dovetail.models.lm_proposer import DraftProposer, DraftVocab
from dovetail.models.target import TargetVerifier
from dovetail.models.tree import TreeShape
from tiny_models import VOCAB, hf_greedy, perturbed, tiny_model

EOS = 1
SHAPES = [TreeShape.chain(1), TreeShape.chain(4), TreeShape(4, 2, 2), TreeShape(8, 4, 2),
          TreeShape(16, 5, 4), TreeShape(16, 7, 10)]


def make_engine(target, draft, shape, eos=EOS, vocab=None, **loop_options):
    proposer = DraftProposer(CachedLM(draft), shape, vocab) if draft is not None else None
    return SpeculativeEngine(TargetVerifier(CachedLM(target)), proposer, [eos], **loop_options)


def speculation_equals_alone(target, draft, shape, prompts, new_tokens=40) -> list:
    """Each prompt decoded greedily by ``target`` alone and with ``draft`` speculating in ``shape``:
    asserts the same tokens, and returns the speculative results (their stats say what was accepted)."""
    alone, engine = make_engine(target, None, shape), make_engine(target, draft, shape)
    results = []
    for p in prompts:
        expected = alone.generate(p, new_tokens).token_ids
        result = engine.generate(p, new_tokens)
        assert result.token_ids == expected
        results.append(result)
    return results


def accepted(result) -> bool:
    """Whether any draft token of ``result`` was accepted."""
    return any(a > 0 for a in result.stats.accepted_per_step)


def prompt(length, seed):
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch,seed,kv_heads", [("llama", 0, 2), ("llama", 1, 4), ("qwen2", 2, 1), ("qwen2", 3, 2)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_identical_to_hf_generate(arch, seed, kv_heads, shape):
    target = tiny_model(arch, seed=seed, num_key_value_heads=kv_heads)
    draft = perturbed(target, 0.05, seed=seed + 100)  # agrees often, not always
    engine = make_engine(target, draft, shape)
    accepted_somewhere = False
    for length in (1, 6, 29):
        p = prompt(length, seed * 31 + length)
        result = engine.generate(p, 40)
        assert result.token_ids == hf_greedy(target, p, 40, eos=EOS)
        accepted_somewhere |= any(a > 0 for a in result.stats.accepted_per_step)
    assert accepted_somewhere, "the draft never got a token accepted: the test would not exercise acceptance"


def test_speculation_off_is_plain_greedy():
    target = tiny_model("qwen2", seed=5)
    engine = make_engine(target, perturbed(target, 0.05), TreeShape.chain(3))
    p = prompt(9, 5)
    result = engine.generate(p, 25, speculate=False)
    assert result.token_ids == hf_greedy(target, p, 25, eos=EOS)
    assert result.stats.steps == len(result.token_ids) - 1 and result.stats.mean_accepted == 1.0


def _perfect_draft_run(max_new_tokens, eos):
    """Draft == target: whole blocks get accepted, so stops land inside a block."""
    target = tiny_model("llama", seed=7)
    engine = make_engine(target, target, TreeShape.chain(4), eos=eos)
    p = prompt(5, 7)
    return target, p, engine.generate(p, max_new_tokens)


def test_max_new_tokens_inside_a_block():
    target, p, result = _perfect_draft_run(7, eos=-1)
    assert result.token_ids == hf_greedy(target, p, 7, eos=None)
    assert len(result.token_ids) == 7
    assert result.stats.accepted_per_step[-1] == 4  # the last block was cut, not short


def test_eos_inside_an_accepted_block():
    target = tiny_model("llama", seed=7)
    p = prompt(5, 7)
    free_run = hf_greedy(target, p, 30, eos=None)
    # Pick as EOS a token that first appears inside a full block (not at a block boundary).
    index = next(i for i, tok in enumerate(free_run) if i % 5 not in (0, 4) and tok not in free_run[:i])
    eos = free_run[index]
    _, _, result = _perfect_draft_run(30, eos=eos)
    assert result.token_ids == hf_greedy(target, p, 30, eos=eos) == free_run[: index + 1]
    assert result.token_ids[-1] == eos


def test_streaming_callback_sees_every_token_in_order():
    target = tiny_model("qwen2", seed=8)
    engine = make_engine(target, perturbed(target, 0.05), TreeShape(8, 4, 2))
    seen = []
    result = engine.generate(prompt(4, 8), 30, on_tokens=seen.extend)
    assert seen == result.token_ids


def test_padded_larger_draft_vocabulary_is_masked():
    target = tiny_model("llama", seed=9)
    draft = tiny_model("llama", seed=9, vocab_size=VOCAB + 32)
    with torch.no_grad():  # the draft prefers the padded ids: masking must keep them out
        draft.lm_head.weight[VOCAB:] = draft.lm_head.weight[:32] * 5
    engine = make_engine(target, draft, TreeShape(8, 3, 3), vocab=DraftVocab(VOCAB))
    p = prompt(6, 9)
    proposals = []
    original = engine.loop.speculator.propose  # every tree the loop gets, for every request
    engine.loop.speculator.propose = lambda items: proposals.extend(original(items)) or proposals[-len(items):]
    assert engine.generate(p, 20).token_ids == hf_greedy(target, p, 20, eos=EOS)
    assert proposals and all(int(t.tree.tokens.max()) < VOCAB for t in proposals)


@pytest.mark.parametrize("betting,max_batch", [(True, 1), (False, 4), (True, 4)], ids=["betting", "batch", "batch+betting"])
def test_one_loop_for_every_mode(betting, max_batch):
    """The in-process loop with bets, a batch, or both (and one request of the batch without
    speculation): each request is the target's own greedy output. Streams read in turn share the
    batch; a stream left unread ends its request."""
    from dovetail.engine import Engine
    from dovetail.request import Request, Tokens, collect

    target = tiny_model("qwen2", seed=2, num_key_value_heads=1)
    engine = make_engine(target, perturbed(target, 0.05, seed=5), TreeShape(8, 4, 2), betting=betting,
                         max_batch=max_batch)
    assert isinstance(engine, Engine)
    prompts = [prompt(n, n) for n in (1, 6, 13, 4, 9)]
    results = engine.generate_batch([Request(p, 40, speculate=i != 3) for i, p in enumerate(prompts)])
    for p, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(target, p, 40, eos=EOS)
    assert results[3].stats.mean_accepted == 1.0 and results[0].stats.mean_accepted > 1.0
    if betting:
        assert results[0].stats.bets == results[0].stats.steps and results[0].stats.bets_held > 0
    a, b = engine.submit(Request(prompts[1], 40)), engine.submit(Request(prompts[2], 40))
    first = next(a)
    assert isinstance(first, Tokens) and collect(b).token_ids == hf_greedy(target, prompts[2], 40, eos=EOS)
    a.close()  # read no further: its request ends at the next step
    assert collect(engine.submit(Request(prompts[4], 40))).token_ids == hf_greedy(target, prompts[4], 40, eos=EOS)
    assert engine.loop.live == [] and engine.loop.verifier.states == {}
