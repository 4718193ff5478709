"""Opt-in (``pytest -m slow``): the packaged Qwen pair on HumanEval, in its two contracts.

* native GGUF blocks (the default): speculative output is token-identical to the same native
  target decoding alone, through the in-process engine and the actor system;
* fp32 (converted once from the GGUF, a few minutes and ~12 GB the first time): token-identical to
  the target's own HF ``generate()``.

Fetches into the real DOVETAIL_HOME (first run: ~1.6 GB of wheels).
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
    return Dovetail(EngineConfig(engine="inprocess", draft=DEFAULT_DRAFT, target_precision="fp32",
                                 draft_precision="int8")).load()


@pytest.fixture(scope="module")
def native():
    from dovetail.api import Dovetail
    from dovetail.config import EngineConfig
    from dovetail.store import DEFAULT_DRAFT

    return Dovetail(EngineConfig(engine="inprocess", draft=DEFAULT_DRAFT)).load()


@pytest.mark.parametrize("problem", [0, 1, 2])
def test_native_pair_identical_to_the_native_target_alone(native, problem):
    from bench.harness import humaneval_prompts

    assert native.target_precision == "native" and native.draft_precision == "native"
    prompt = humaneval_prompts(native.tokenizer, problem + 1)[problem]
    alone = native.generate_ids(prompt, 96, speculate=False)
    result = native.generate_ids(prompt, 96)
    assert result.token_ids == alone.token_ids
    assert result.stats.mean_accepted > 1.5


def test_native_pair_through_the_actors_identical_to_in_process(native):
    from dovetail.api import Dovetail
    from bench.harness import humaneval_prompts
    from dovetail.config import EngineConfig
    from dovetail.store import DEFAULT_DRAFT

    prompt = humaneval_prompts(native.tokenizer, 1)[0]
    expected = native.generate_ids(prompt, 64, speculate=False).token_ids
    with Dovetail(EngineConfig(engine="actors", draft=DEFAULT_DRAFT)) as actors:
        assert actors.generate_ids(prompt, 64).token_ids == expected


@pytest.mark.parametrize("problem", [0, 1, 2])
def test_qwen_pair_identical_to_hf_greedy(dovetail, problem):
    from bench.harness import humaneval_prompts
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
