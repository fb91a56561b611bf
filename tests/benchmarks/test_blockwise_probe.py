"""benchmarks/probes/blockwise_probe.py's math on the CPU: the low-rank branch folded into the block-scaled GEMM as
one more K block of FP8 hi + lo parts reproduces L U^T at about bf16 precision (and the hi parts alone would not)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "probes"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))


@pytest.mark.parametrize("w_mode", ["128x128", "1x128"])
def test_branch_fold_reproduces_the_branch_at_bf16_precision(w_mode):
    import blockwise_probe as bp

    g = torch.Generator().manual_seed(0)
    m, k, n = 48, 256, 256
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    lr = torch.randn(m, bp.RANK, generator=g) * torch.logspace(-2, 1, m).unsqueeze(1)  # rows of unequal size
    up = (torch.randn(n, bp.RANK, generator=g) * 0.05).bfloat16()
    q, s = bp.quant_1x128(x)
    wq, ws = (bp.quant_128x128 if w_mode == "128x128" else bp.quant_w_1x128)(w)
    a, sa = bp.fold_branch_a(q, s, lr)
    b, sb = bp.fold_branch_b(wq, ws, up)
    assert a.shape == (m, k + bp.BLOCK) and sa.shape == (m, k // bp.BLOCK + 1)
    scale_rows = n // bp.BLOCK if w_mode == "128x128" else n
    assert b.shape == (n, k + bp.BLOCK) and sb.shape == (scale_rows, k // bp.BLOCK + 1)
    branch = bp.blockwise_mm_torch(a, sa, b, sb) - bp.blockwise_mm_torch(q, s, wq, ws)
    want = lr @ up.float().t()
    err = bp.rel(branch, want)
    assert err < 2 ** -8, err  # bf16-level: a bf16 rounding of each factor is up to 2^-9 relative
    hi_only = a.clone()
    hi_only[:, k + 2 * bp.RANK:k + 3 * bp.RANK] = 0  # drop L_lo * U_hi
    b_hi = b.clone()
    b_hi[:, k + bp.RANK:k + 2 * bp.RANK] = 0  # drop L_hi * U_lo
    coarse = bp.blockwise_mm_torch(hi_only, sa, b_hi, sb) - bp.blockwise_mm_torch(q, s, wq, ws)
    assert bp.rel(coarse, want) > 8 * err  # the lo parts are what makes it 16-bit-like


def test_block_quantization_is_local_to_128_columns():
    import blockwise_probe as bp

    x = torch.randn(4, 256)
    x[:, 200] = 1000.0  # an outlier in the second block only
    q, s = bp.quant_1x128(x)
    assert torch.equal(s[:, 0], x[:, :128].abs().amax(1) / bp.E4M3_MAX)
    deq = q.float().reshape(4, 2, 128) * s.unsqueeze(-1)
    assert bp.rel(deq[:, 0], x[:, :128]) < 2 ** -4  # the first block keeps e4m3 precision despite the outlier
