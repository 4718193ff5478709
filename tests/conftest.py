import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one build of the quantized kernels for the whole session, subprocesses and isolated homes included
os.environ.setdefault("DOVETAIL_KERNEL_CACHE",
                      str(Path(os.environ.get("DOVETAIL_HOME", Path.home() / ".cache" / "dovetail")) / "kernels"))
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from tiny_models import VOCAB, tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """A private DOVETAIL_HOME, so no test touches (or fetches into) the real model store."""
    home = tmp_path / "dovetail-home"
    monkeypatch.setenv("DOVETAIL_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """HF folders of a tiny target and draft sharing one tokenizer (context 64)."""
    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer = tiny_tokenizer(VOCAB)
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
    dirs = {}
    for role, seed in (("target", 0), ("draft", 1)):
        model = tiny_model("llama", seed=seed, max_position_embeddings=64)  # qwen2 would swap in its BPE tokenizer
        model.generation_config.eos_token_id = 1
        model.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
        dirs[role] = root / role
    return dirs


# -- leaving --------------------------------------------------------------------------------------
_EXIT = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


def pytest_unconfigure(config):
    """Exit with pytest's status without the interpreter's teardown. After the session's Ray
    instances and clusters have come and gone, a native library's exit handler crashed the
    process (SIGSEGV, status 139) once after all tests had passed; the status must be the tests'."""
    if "status" in _EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])
