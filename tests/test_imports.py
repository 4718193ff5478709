"""The decode loop's types and the engine configuration import without torch: the CLI's argument
parsing, the HTTP edge and tools that only build requests should not pay torch's start-up."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["dovetail.request", "dovetail.decode", "dovetail.config"])
def test_module_imports_without_torch(module):
    # a fresh interpreter: this one has torch loaded already (conftest)
    probe = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:1])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {module} loads torch"
