"""Shared fixtures, and the test tiers.

Tiers (README): ``python -m pytest`` runs the unit and in-process tests; ``python -m pytest -m
integration`` runs what needs real processes of the system (Ray actors, Serve over HTTP, a
cluster, ``launch.py`` subprocesses, drafter training, a second kernel build); ``-m slow`` the
real-model tests. A test's tier follows from what it uses: requesting one of the fixtures in
``INTEGRATION_FIXTURES`` marks it ``integration`` at collection, so a new test lands in the right
tier by asking for what it needs, and no list of test names is kept anywhere.
"""

import os
import subprocess
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

from tiny_models import VOCAB, perturbed, tiny_model, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
# the served pair's: the same text, and it refuses as real templates do (Gemma's on roles that do not
# alternate; the Jinja sandbox on a message asking for unsafe attributes)
SERVED_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.index0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['content'] == 'unsafe' %}{{ m.__class__.__mro__ }}{% endif %}"
    "<s> {{ m['content'] }} {% endfor %}")
SERVER_START_TIMEOUT_S = 180
# Ray's unix sockets live inside its temp dir, whose path must stay short (a long TMPDIR would not)
RAY_TEMP_DIR = "/tmp/dovetail-test-ray"

INTEGRATION_FIXTURES = {
    "ray_session": "Ray actors started from this process",
    "ray_cluster": "a multi-node Ray cluster on this machine",
    "server": "`launch.py serve` over real HTTP",
    "serve_process": "a server process of the test's own",
    "launch": "`launch.py` subprocesses",
    "feature_dump": "drafter training (the features it learns from)",
    "portable_kernels": "a second build of the kernels",
}


@pytest.hookimpl(tryfirst=True)  # before -m selects: the marks must be there when it reads them
def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES.keys() & set(item.fixturenames) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)


# -- models ---------------------------------------------------------------------------------------
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
    tokenizer.chat_template = CHAT_TEMPLATE
    dirs = {}
    for role, seed in (("target", 0), ("draft", 1)):
        model = tiny_model("llama", seed=seed, max_position_embeddings=64)  # qwen2 would swap in its BPE tokenizer
        model.generation_config.eos_token_id = 1
        model.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
        dirs[role] = root / role
    return dirs


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(target model, tokenizer, folder) of the pair the servers and the cluster serve: tiny random
    models with a 2048-token context whose target never picks EOS greedily (its EOS row is zeroed),
    so greedy requests run to max_tokens and long requests can be cut short."""
    root = tmp_path_factory.mktemp("served")
    tokenizer = tiny_tokenizer(VOCAB)
    tokenizer.chat_template = SERVED_CHAT_TEMPLATE
    target = tiny_model("llama", seed=21, max_position_embeddings=2048)
    with torch.no_grad():
        target.lm_head.weight[1].zero_()  # EOS (id 1) never wins greedily
    draft = perturbed(target, 0.05, seed=22)
    for name, model in (("target", target), ("draft", draft)):
        model.generation_config.eos_token_id = 1
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return target, tokenizer, root


# -- integration: real processes ------------------------------------------------------------------
@pytest.fixture(scope="session")
def _ray_for_the_session():
    """Ray is started by the first test that asks for it and kept for the session (one start, not
    one a module); it is stopped once, at the end."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_session(_ray_for_the_session):
    """Ray, running in this process. Yields the shared-memory segments that existed before the
    test, so the test can check it left none of its own."""
    import ray

    from dovetail.protocol.shm import segment_names

    if not ray.is_initialized():  # first use, or a cluster test stopped it
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=RAY_TEMP_DIR, logging_level="WARNING")
    return segment_names()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster (a CPU-less head, two one-CPU nodes), this process connected to it;
    yields (cluster, node ids). The session's single-node Ray gives way to it meanwhile."""
    import ray

    from bench.cluster import local_cluster

    if ray.is_initialized():
        ray.shutdown()
    with local_cluster([1, 1], env={"DOVETAIL_HOME": str(tmp_path_factory.mktemp("home"))}) as made:
        yield made


@pytest.fixture
def serve_process(tmp_path):
    """``serve_process(args, **options)``: a ``launch.py serve`` (or ``command=``) of the test's own,
    its log in the test's folder, started with the suite's patience; use it in ``with``."""
    from dovetail.serve.server import ServerProcess

    def make(args, name="server", **options):
        options.setdefault("timeout_s", SERVER_START_TIMEOUT_S)
        return ServerProcess(args, tmp_path / f"{name}.log", **options)

    return make


@pytest.fixture(scope="session")
def server(served, tmp_path_factory):
    """One running ``launch.py serve`` of the served pair on a free loopback port, shared by every
    test that speaks to it; its log file is in ``log``. It must stop cleanly and leave no
    shared-memory segment behind."""
    from dovetail.protocol.shm import segment_names
    from dovetail.serve.server import ServerProcess

    _, _, root = served
    home = tmp_path_factory.mktemp("home")
    before = segment_names()
    args = ["--target", str(root / "target"), "--draft", str(root / "draft"), "--draft-precision", "fp32",
            "--max-queued-requests", "48"]
    proc = ServerProcess(args, home / "server.log", env={"DOVETAIL_HOME": str(home)},
                         timeout_s=SERVER_START_TIMEOUT_S)
    with proc:
        yield {"url": proc.url, "proc": proc.proc, "log": proc.log_path}
        assert proc.stop() == 0, "the server did not stop cleanly on SIGTERM"
    assert segment_names() <= before, "the server left shared-memory segments behind"


@pytest.fixture
def launch():
    """``launch(*args, cwd=ROOT, timeout=300)``: ``python launch.py ARGS`` in a real process (the
    test's environment, DOVETAIL_HOME included), its CompletedProcess with text output."""
    def run(*args, cwd=ROOT, timeout=300):
        return subprocess.run([sys.executable, str(ROOT / "launch.py"), *map(str, args)], cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def portable_kernels():
    """The kernels built as a CPU without x86 gets them: the portable path alone (a second build,
    about a minute)."""
    from dovetail.kernels import build_id, compile_kernels, kernel_cache

    flags = ("-DDOVETAIL_NO_X86",)
    return compile_kernels(kernel_cache() / build_id(flags), flags)


# -- leaving --------------------------------------------------------------------------------------
_EXIT = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


def pytest_unconfigure(config):
    """Exit with pytest's status without the interpreter's teardown: after the session's Ray
    instances and clusters have come and gone, a native library's exit handler can crash the
    process (SIGSEGV) after all tests passed, and the status must be the tests'."""
    if "status" in _EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])
