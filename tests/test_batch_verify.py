"""Several requests in one forward: verifying their trees (models/cached_lm.forward_trees) gives
the same logits as one forward per request, drafting them together (models/draft.propose_together)
the same trees as drafting one after another, and greedy output stays identical to the target's."""

import copy

import pytest
import torch

from dovetail.models.cached_lm import CachedLM
from dovetail.models.lm_proposer import DraftProposer, propose_together
from dovetail.models.target import TargetVerifier, verify_batch
from dovetail.models.tree import TreeShape
from dovetail.sampling import SamplingParams
from tiny_models import hf_greedy, perturbed, tiny_model

PROMPTS = [[5, 9, 14], list(range(3, 40)), [7] * 11, [20, 21, 22, 23, 24, 25, 26]]


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("qwen2", seed=31, num_key_value_heads=2)
    return target, perturbed(target, 0.05, seed=32)


def _started(target, draft, shape):
    verifiers = [TargetVerifier(CachedLM(target)) for _ in PROMPTS]
    proposers = [DraftProposer(CachedLM(draft), shape) for _ in PROMPTS]
    firsts = []
    for verifier, proposer, prompt in zip(verifiers, proposers, PROMPTS):
        firsts.append([verifier.start(prompt, SamplingParams())])
        proposer.start(prompt)
    return verifiers, proposers, firsts


def test_batched_forward_matches_separate_forwards(pair):
    target, draft = pair
    verifiers, proposers, firsts = _started(target, draft, TreeShape(8, 4, 2))
    trees = [p.propose(f) for p, f in zip(proposers, firsts)]
    alone = [copy.deepcopy(v) for v in verifiers]
    expected = [v.lm.forward_tree(t.tokens, t.parents, range(len(t)), v.lm.committed) for v, t in zip(alone, trees)]
    from dovetail.models.cached_lm import forward_trees

    got = forward_trees([v.lm for v in verifiers], trees)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    for v, a, t in zip(verifiers, alone, trees):  # the pending entries match too: commit and compare
        v.lm.commit(list(range(len(t))))
        a.lm.commit(list(range(len(t))))
        for lv, la in zip(v.lm.cache.layers, a.lm.cache.layers):
            torch.testing.assert_close(lv.keys, la.keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [TreeShape.chain(3), TreeShape(8, 4, 2)], ids=str)
def test_batched_greedy_identical_to_target(pair, shape):
    target, draft = pair
    n = 30
    verifiers, proposers, outputs = _started(target, draft, shape)
    alone = [DraftProposer(CachedLM(draft), shape) for _ in PROMPTS]  # the same drafts, one at a time
    for proposer, prompt in zip(alone, PROMPTS):
        proposer.start(prompt)
    new = [list(o) for o in outputs]
    accepted = 0
    while any(len(o) < n for o in outputs):
        live = [i for i, o in enumerate(outputs) if len(o) < n]  # requests leave the batch as they finish
        trees = propose_together([proposers[i] for i in live], [new[i] for i in live])
        for i, tree in zip(live, trees):
            expected = alone[i].propose(new[i])
            assert tree.tokens.tolist() == expected.tokens.tolist()
            assert tree.parents.tolist() == expected.parents.tolist()
            assert proposers[i].lm.committed == alone[i].lm.committed
        for i, acc in zip(live, verify_batch([verifiers[i] for i in live], trees)):
            outputs[i].extend(acc.tokens)
            new[i] = acc.tokens
            accepted += acc.accepted_draft_tokens
    for prompt, out in zip(PROMPTS, outputs):
        assert out[:n] == hf_greedy(target, prompt, n)
    assert accepted > 0


def test_one_failing_acceptance_does_not_fail_the_batch(pair):
    """A request whose own acceptance raises gets its exception back; the others of the batch get
    the acceptances they would have had alone, and its cache keeps no pending block."""
    target, draft = pair
    verifiers, proposers, firsts = _started(target, draft, TreeShape.chain(3))
    trees = [p.propose(f) for p, f in zip(proposers, firsts)]
    alone = [copy.deepcopy(v) for v in verifiers]
    expected = [v.verify(t) for v, t in zip(alone, trees)]

    def broken(tree, logits):
        raise FloatingPointError("probabilities are NaN")

    verifiers[1].accept = broken
    results = verify_batch(verifiers, trees)
    assert isinstance(results[1], FloatingPointError)
    assert not verifiers[1].lm._pending_nodes
    for i in (0, 2, 3):
        assert results[i].tokens == expected[i].tokens and results[i].path == expected[i].path
