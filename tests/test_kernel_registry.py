"""The kernel registry and the architecture boundary: one table names every path's kernels, the
x86 kernels live under ``csrc/x86/`` alone, and without them (what a non-x86 CPU builds) the
portable path computes the same bits as every x86 path."""

import re

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from dovetail.kernels import SOURCE_DIR, ops
from dovetail.kernels.packing import decode, encode, pack

ARCH_SPECIFIC = re.compile(r"immintrin|\b_mm\d*_|\b__m(128|256|512)|__builtin_cpu_|target\(\"")


def test_architecture_specific_code_lives_under_x86_only():
    outside = [p for p in SOURCE_DIR.rglob("*") if p.suffix in (".cpp", ".h") and "x86" not in p.parts]
    assert {p.name for p in outside} >= {"kernels.h", "registry.cpp", "matmul.cpp", "attention.cpp"}
    offenders = [f"{p.name}: {m.group(0)}" for p in outside for m in ARCH_SPECIFIC.finditer(p.read_text())]
    assert not offenders, offenders


def test_every_path_this_cpu_runs_is_registered_by_name():
    names = [ops().kernel_path_name(isa) for isa in range(1, ops().best_isa() + 1)]
    assert names[0] == "scalar" and len(set(names)) == len(names)
    assert ops().kernel_path_name(0) == names[-1]


def test_the_portable_build_alone_gives_the_bits_of_every_x86_path(portable_kernels):
    portable = portable_kernels
    assert not portable.built_for_x86() and portable.best_isa() == 1 and portable.kernel_path_name() == "scalar"
    g = torch.Generator().manual_seed(0)
    for qtype, rows, cols in ((QT.Q4_K, 40, 512), (QT.Q6_K, 33, 256), (QT.Q8_0, 20, 96), (QT.Q5_0, 17, 64)):
        w = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)
        pw = pack(decode(encode(w, qtype), qtype, rows, cols))
        x = torch.randn(5, cols, generator=g)
        want = portable.qmatmul(x, *pw.args(), *pw.scheme_args(), 0)
        for isa in range(1, ops().best_isa() + 1):
            assert torch.equal(ops().qmatmul(x, *pw.args(), *pw.scheme_args(), isa), want), (qtype.name, isa)
    q, k, v = torch.randn(4, 3, 32, generator=g), torch.randn(2, 50, 32, generator=g), torch.randn(2, 50, 32, generator=g)
    visible = torch.ones(3, 50, dtype=torch.bool)
    want = portable.row_attention(q, k, v, visible, 0.2)
    for isa in range(1, ops().best_isa() + 1):
        assert torch.equal(ops().row_attention(q, k, v, visible, 0.2, isa), want)
    probs = (torch.randn(3, 5003, generator=g) * 3).softmax(-1)  # a length no kernel's block divides
    for top_k, top_p in ((0, 0.9), (40, 1.0), (300, 0.7)):
        want = probs.clone()
        portable.filter_probs_(want, top_k, top_p)
        for isa in range(1, ops().best_isa() + 1):
            got = probs.clone()
            ops().filter_probs_(got, top_k, top_p, isa)
            assert torch.equal(got, want), (top_k, top_p, isa)
