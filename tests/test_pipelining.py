"""The draft's pipelining bet: predraft + resolve keep the output exact, hit or miss."""

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
