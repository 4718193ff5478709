"""Faster fp32 linears for small blocks of rows on CPU (the verification lever).

Stock ``F.linear`` with 2-16 rows goes through a GEMM path that re-packs the whole weight matrix
on every call, so a 4-token verification costs twice a 1-token step. Two kernels avoid it:

* ``"mm"``: ``W @ x.T``, the weight as the left operand, which MKL streams once like a GEMV.
  Flat from 1 to 4 rows; no extra memory. MKL is fastest at row counts that are multiples of 4,
  and 16 rows can cost less than 11-15, so blocks are padded with zero rows (``padded_rows``):
  3 -> 4, 7 -> 8, 11-15 -> 16, 19 -> 20. Batched verification of 3 requests' 4-token blocks
  (12 rows) gains the most.
* ``"mkldnn"``: oneDNN linear on a weight converted once to a oneDNN tensor. Best at 1 row and
  at 8+ rows; the converted weight replaces the dense one (no extra memory).

``accelerate_linears`` swaps them into a model; ``set_linear_kernel`` switches a swapped model
between the two dense kernels (``stock``/``mm``) without copying weights (the benchmark's
before/after curve).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dovetail.models.spec import LINEAR_KERNELS


def padded_rows(rows: int) -> int:
    """The row count MKL multiplies fastest at, among those >= ``rows`` (see the module doc)."""
    if 11 <= rows < 16:
        return 16
    return rows + 1 if rows % 4 == 3 else rows


class FastLinear(nn.Module):
    """Drop-in replacement for an ``nn.Linear`` (inference only), with a chosen kernel."""

    def __init__(self, linear: nn.Linear, kernel: str):
        super().__init__()
        if kernel not in LINEAR_KERNELS:
            raise ValueError(f"unknown linear kernel {kernel!r}; choose from {LINEAR_KERNELS}")
        self.kernel = kernel
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.weight = weight.to_mkldnn() if kernel == "mkldnn" else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # Row-major rows matter: MKL takes a much slower path for W @ (column-major x).T.
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if self.kernel == "mm":
            rows = x2.shape[0]
            if padded_rows(rows) > rows:
                x2 = torch.cat([x2, x2.new_zeros(padded_rows(rows) - rows, x2.shape[1])])
            y = torch.mm(self.weight, x2.t()).t()[:rows].contiguous()
            if self.bias is not None:
                y = y + self.bias
        elif self.kernel == "mkldnn":
            y = torch._C._nn.mkldnn_linear(x2.to_mkldnn(), self.weight, None).to_dense()
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2, self.weight, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


def accelerate_linears(model: nn.Module, kernel: str) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a ``FastLinear`` (in place). ``stock`` is a no-op."""
    if kernel == "stock":
        return model
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, FastLinear(child, kernel))
    return model


def set_linear_kernel(model: nn.Module, kernel: str) -> None:
    """Switch every dense ``FastLinear`` in ``model`` to ``kernel`` (``stock`` or ``mm``)."""
    if kernel not in ("stock", "mm"):
        raise ValueError("only the dense kernels can be switched in place")
    for module in model.modules():
        if isinstance(module, FastLinear) and module.kernel in ("stock", "mm"):
            module.kernel = kernel
