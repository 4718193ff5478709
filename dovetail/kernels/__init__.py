"""Quantized CPU kernels: built from source on first use, chosen at run time by CPU features.

``ops()`` compiles ``csrc/`` once per source version (cached under ``$DOVETAIL_HOME/kernels``, or
``$DOVETAIL_KERNEL_CACHE``) and loads it. One binary carries every path -- portable scalar,
AVX2 + FMA, AVX-512 VNNI -- each function compiled for its own instruction set, and the best
one this CPU runs is picked when called (``best_isa``), so the cache can move between machines.
``csrc/ops.h`` maps the sources: one file per operator family, the kernel registry in
``registry.cpp``, the x86 kernels under ``x86/`` (a non-x86 CPU builds the portable path alone).
The block formats are listed once, in ``formats.py``: each build writes them as ``formats.h``
into its own folder, which the sources include.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from dovetail.errors import UserError
from dovetail.kernels.formats import c_header

SOURCE_DIR = Path(__file__).with_name("csrc")
FORMATS_HEADER = "formats.h"  # generated, in the build folder (kernels.h includes it)
# -fopenmp: ATen's parallel_for is inline OpenMP, single-threaded without it. At run time the
# libgomp that torch already loaded (same soname) serves it, so there is one thread pool.
CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]  # passed as a copy: cpp_extension.load appends torch's libraries to its list
_lock = threading.Lock()
_ops = None


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.rglob("*.cpp"))


def build_id(extra_cflags: tuple[str, ...] = ()) -> str:
    """Names this source and these flags' build (what a measured cost depends on)."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.rglob("*")):
        if path.suffix in (".cpp", ".h"):
            digest.update(str(path.relative_to(SOURCE_DIR)).encode() + b"\0" + path.read_bytes())
    digest.update(FORMATS_HEADER.encode() + b"\0" + c_header().encode())
    digest.update(" ".join(CFLAGS + list(extra_cflags) + LDFLAGS).encode())
    return f"kernels-{digest.hexdigest()[:12]}"


def _build_dir() -> Path:
    return kernel_cache() / build_id()


def kernel_cache() -> Path:
    from dovetail.store import dovetail_home

    return Path(os.environ["DOVETAIL_KERNEL_CACHE"]) if os.environ.get("DOVETAIL_KERNEL_CACHE") else (
        dovetail_home() / "kernels")


def ops():
    """The compiled extension (compiling it first if this source version has not been built)."""
    global _ops
    if _ops is not None:
        return _ops
    with _lock:
        if _ops is None:
            _ops = _load()
    return _ops


def _load():
    return compile_kernels(_build_dir())


def compile_kernels(build: Path, extra_cflags: tuple[str, ...] = ()):
    """Builds (unless ``build`` holds it already) and loads the extension. ``extra_cflags`` are for
    tests: ``-DDOVETAIL_NO_X86`` builds what a non-x86 CPU gets, the portable path alone."""
    from torch.utils import cpp_extension

    built = any(build.glob("*.so"))
    if not built:
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise UserError(f"no C++ compiler found ({compiler!r}): install g++ to build Dovetail's quantized kernels "
                            "(or run with --target-precision fp32 --draft-precision fp32)")
        if shutil.which("ninja") is None and not _ninja_from_pip():
            raise UserError("the 'ninja' build tool is missing: pip install ninja")
        print(f"[dovetail] compiling the quantized CPU kernels (once, about a minute) into {build}",
              file=sys.stderr, flush=True)
    build.mkdir(parents=True, exist_ok=True)
    _write_if_changed(build / FORMATS_HEADER, c_header())
    t0 = time.perf_counter()
    try:
        module = cpp_extension.load(name="dovetail_kernels" + ("_" + build.name.replace("-", "_") if extra_cflags else ""),
                                    sources=[str(p) for p in sources()], build_directory=str(build),
                                    extra_cflags=CFLAGS + list(extra_cflags), extra_ldflags=list(LDFLAGS),
                                    extra_include_paths=[str(SOURCE_DIR), str(build)], verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:
        lines = str(exc).strip().splitlines()
        errors = [line.strip() for line in lines if "error:" in line or "Error:" in line]
        detail = (errors or lines or [type(exc).__name__])[0 if errors else -1]
        raise UserError(f"building the quantized kernels failed: {detail} (build folder: {build})") from None
    if not built:
        print(f"[dovetail] kernels built in {time.perf_counter() - t0:.0f}s "
              f"(this CPU: {module.kernel_path_name(0)})", file=sys.stderr, flush=True)
    return module


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless ``path`` holds it already: a newer header would make ninja rebuild
    every source; a rename, so a concurrent build never reads half a file."""
    if path.exists() and path.read_text() == text:
        return
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(path)


def _ninja_from_pip() -> bool:
    """``pip install ninja`` puts the binary next to the interpreter, which may not be on PATH."""
    candidate = Path(sys.executable).with_name("ninja")
    if candidate.exists():
        os.environ["PATH"] = f"{candidate.parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return True
    return False


# DOVETAIL_KERNEL_ISA = scalar | avx2 | avx512: force one kernel path (tests, benchmarks); default: the best
_ISA_CODES = {"": 0, "auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}


def kernel_isa() -> int:
    """The kernel path every operator is asked for (0: the best this CPU runs)."""
    name = os.environ.get("DOVETAIL_KERNEL_ISA", "").lower()
    if name not in _ISA_CODES:
        raise UserError(f"DOVETAIL_KERNEL_ISA must be one of {sorted(k for k in _ISA_CODES if k)}, got {name!r}")
    return _ISA_CODES[name]


def kernel_path_name() -> str:
    """The kernel path the operators run (DOVETAIL_KERNEL_ISA, or the best this CPU has)."""
    return ops().kernel_path_name(kernel_isa())
