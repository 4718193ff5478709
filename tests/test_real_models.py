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
    from bench.common import humaneval_prompts

    assert native.target_precision == "native" and native.draft_precision == "q4"
    prompt = humaneval_prompts(native.tokenizer, problem + 1)[problem]
    alone = native.generate_ids(prompt, 96, speculate=False)
    result = native.generate_ids(prompt, 96)
    assert result.token_ids == alone.token_ids
    assert result.stats.mean_accepted > 1.5


def test_native_pair_through_the_actors_identical_to_in_process(native):
    from dovetail.api import Dovetail
    from bench.common import humaneval_prompts
    from dovetail.config import EngineConfig
    from dovetail.store import DEFAULT_DRAFT

    prompt = humaneval_prompts(native.tokenizer, 1)[0]
    expected = native.generate_ids(prompt, 64, speculate=False).token_ids
    with Dovetail(EngineConfig(engine="actors", draft=DEFAULT_DRAFT)) as actors:
        assert actors.generate_ids(prompt, 64).token_ids == expected


@pytest.mark.parametrize("problem", [0, 1, 2])
def test_qwen_pair_identical_to_hf_greedy(dovetail, problem):
    from bench.common import humaneval_prompts
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


def test_check_passes_on_the_packaged_pair(launch):
    """``launch.py check`` with its defaults on the packaged pair: every check passes, in minutes."""
    run = launch("check", timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "all checks passed" in run.stdout and run.stdout.count("PASS  ") == 3


def test_the_packaged_file_renamed_and_moved_runs_by_path_exactly(tmp_path):
    """The 1.5B GGUF under a user's own name, given by path: the same tokens as the packaged name."""
    import os

    from dovetail.api import Dovetail
    from dovetail.config import EngineConfig
    from dovetail.store import DEFAULT_TARGET, ModelStore

    moved = tmp_path / "models" / "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
    moved.parent.mkdir()
    os.link(ModelStore().fetch(DEFAULT_TARGET) / "model.gguf", moved)  # a second name, no copy
    outputs = []
    for target in (DEFAULT_TARGET, str(moved), str(moved.parent)):
        with Dovetail(EngineConfig(target=target, draft=None, engine="inprocess")) as dt:
            outputs.append(dt.generate("def fibonacci(n):", max_new_tokens=32)["token_ids"])
    assert outputs[0] == outputs[1] == outputs[2]


def _fp32_is_hf_greedy_by_path(packaged: str):
    """Run packaged model ``packaged`` by its file path in fp32 and check it is token-identical to
    transformers' own greedy decoding of the same GGUF; returns (the file, prompt ids, fp32 tokens)."""
    from transformers import AutoModelForCausalLM

    from dovetail.api import Dovetail
    from dovetail.config import EngineConfig
    from dovetail.store import ModelStore
    from tiny_models import hf_greedy

    gguf = ModelStore().fetch(packaged) / "model.gguf"
    with Dovetail(EngineConfig(target=str(gguf), draft=None, engine="inprocess", target_precision="fp32")) as dt:
        ids = dt.tokenizer.encode("def fibonacci(n):")
        fp32 = dt.engine.generate(ids, 32).token_ids
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    assert fp32 == hf_greedy(hf, ids, 32, eos=None)[:len(fp32)]
    return gguf, ids, fp32


def _report_agreement(name: str, native: list[int], fp32: list[int]) -> None:
    agree = next((i for i, (a, b) in enumerate(zip(native, fp32)) if a != b), len(fp32))
    print(f"{name} native agrees with fp32 on the first {agree} of {len(fp32)} tokens")
    assert agree >= 1


def test_smollm2_by_path_fp32_is_hf_greedy_and_native_agrees_mostly():
    """SmolLM2-135M (llama, Q4_1) by its file: fp32 is token-identical to transformers' own greedy
    decoding of the same GGUF; native (int8 activations) is measured against it, not asserted."""
    from dovetail.api import Dovetail
    from dovetail.config import EngineConfig

    gguf, ids, fp32 = _fp32_is_hf_greedy_by_path("smollm2-135m-instruct")
    with Dovetail(EngineConfig(target=str(gguf), draft=None, engine="inprocess")) as dt:
        native = dt.engine.generate(ids, 32).token_ids
    _report_agreement("SmolLM2", native, fp32)


def test_gemma3_by_path_fp32_is_hf_greedy_and_native_speculation_is_exact():
    """Gemma-3-270M (gemma3: the norm offset, QK-norm, sliding-window layers, the embedding scale)
    by its file: fp32 is token-identical to transformers' own greedy decoding of the same GGUF;
    native runs the lean forward, its agreement with fp32 is measured, and speculation (the model
    drafting for itself through a tree) is token-identical to native alone."""
    from dovetail.api import Dovetail
    from dovetail.config import EngineConfig
    from dovetail.models import fast_forward
    from dovetail.models.quantized import load_quantized
    from dovetail.store import resolve_model

    gguf, ids, fp32 = _fp32_is_hf_greedy_by_path("gemma-3-270m")
    assert fast_forward.supports(load_quantized(resolve_model(str(gguf)), "native"))
    with Dovetail(EngineConfig(target=str(gguf), draft=None, engine="inprocess")) as dt:
        native = dt.engine.generate(ids, 32).token_ids
    with Dovetail(EngineConfig(target=str(gguf), draft=str(gguf), engine="inprocess", tree="8,4,2")) as dt:
        assert dt.engine.generate(ids, 32).token_ids == native
    _report_agreement("Gemma-3-270M", native, fp32)
