"""The draft's pipelining bet: predraft + settle / resolve keep the output exact, hit or miss."""

import pytest
import torch

from dovetail.request import OutputBuffer
from dovetail.models.cached_lm import CachedLM
from dovetail.models.lm_proposer import DraftProposer
from dovetail.models.target import TargetVerifier
from dovetail.models.tree import TreeShape
from dovetail.sampling import SamplingParams
from tiny_models import hf_greedy, perturbed, tiny_model


@pytest.mark.parametrize("shape", ["chain:1", "chain:3", "8,4,2", "16,5,4"])
def test_predraft_then_resolve_is_exact(shape):
    hits = misses = 0
    for seed in range(3):
        target = tiny_model("qwen2", seed=seed)
        draft = DraftProposer(CachedLM(perturbed(target, 0.03, seed=seed + 9)), TreeShape.parse(shape))
        verifier = TargetVerifier(CachedLM(target))
        prompt = torch.randint(3, 96, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
        out = OutputBuffer(40, {1})
        new = [verifier.start(prompt, SamplingParams())]
        draft.start(prompt)
        done, tree = out.add(new), draft.propose(new)
        while not done:
            guess, _ = draft.predraft()  # what the draft would do while the target verifies
            acceptance = verifier.verify(tree)
            done = out.add(acceptance.tokens)
            tree, held = draft.resolve(acceptance.tokens)
            assert held == (guess == acceptance.tokens)
            hits, misses = hits + held, misses + (not held)
        assert out.tokens == hf_greedy(target, prompt, 40, eos=1)
    assert hits and misses, "both outcomes of the bet must be exercised"


def test_feed_then_grow_is_propose_and_a_missed_bet_is_fed():
    """The one proposer interface: ``propose`` is ``feed`` then ``grow``; ``settle`` on a missed bet
    leaves the draft as if it had been told the outcome without betting (the same next tree)."""
    target = tiny_model("qwen2", seed=4)
    model = CachedLM(perturbed(target, 0.05, seed=13))
    shape = TreeShape.parse("8,4,2")
    a, b = DraftProposer(model, shape), DraftProposer(model.fresh(), shape)
    prompt = [5, 9, 17, 33, 2, 71]
    a.start(prompt), b.start(prompt)
    a.feed([40]), b.feed([40])
    assert a.tree is None and not a.betting
    first, again = a.grow(), b.grow()
    assert first.tokens.tolist() == again.tokens.tolist() and first.parents.tolist() == again.parents.tolist()
    guess, _ = a.predraft()
    wrong = [3 if guess[0] != 3 else 4]  # no draft token accepted, another bonus: the bet misses
    assert a.betting and not a.settle(wrong) and not a.betting
    expected = b.propose(wrong)
    got = a.grow()
    assert got.tokens.tolist() == expected.tokens.tolist() and got.parents.tolist() == expected.parents.tolist()
    guess, bet_tree = a.predraft()
    assert a.settle(guess) and a.tree is bet_tree  # a held bet's tree is the next step's
