"""The verification linears: same results as F.linear for every block size, padding included."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dovetail.models.fast_linear import FastLinear, padded_rows


def test_padding_rule():
    assert [padded_rows(r) for r in (1, 2, 3, 4, 7, 8, 10, 11, 12, 15, 16, 19, 20)] == \
        [1, 2, 4, 4, 8, 8, 10, 16, 16, 16, 16, 20, 20]


@pytest.mark.parametrize("kernel", ["mm", "mkldnn"])
def test_fast_linear_matches_f_linear(kernel):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    fast = FastLinear(linear, kernel)
    for rows in range(1, 21):
        x = torch.randn(1, rows, 64)
        torch.testing.assert_close(fast(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
