"""``kernels/gemm_grouped``: ``grouped_gemm`` (per-group scales of both operands) against ``grouped_gemm_torch``.
"""
from __future__ import annotations

import pytest
import torch

from .kernel_helpers import SQNR_FP32_REORDER_DB, SQNR_GPU_ACCUMULATE_DB, gemm_operands, sqnr_db

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("up_dtype", [torch.float32, torch.bfloat16], ids=["fp32-up", "bf16-up"])
@pytest.mark.parametrize("rank", [24, 100], ids=["rank24", "rank100-chunked"])
def test_grouped_gemm_matches_twin(device, rank, up_dtype):
    from fourbit.kernels.gemm import GemmConfig
    from fourbit.kernels.gemm_grouped import grouped_gemm, grouped_gemm_torch

    m, n, k, g = 40, 72, 256, 64
    a, b = gemm_operands(torch.float8_e4m3fn, m, n, k)
    sa, sb = torch.rand(k // g, m) + 0.1, torch.rand(k // g, n) + 0.1
    # up holding bf16 values as the layers store them: as fp32 (exact in the epilogue's tf32 dot), or as bf16 (the
    # branch in 16 bits, lr rounded once: ``gemm.add_branch``, the twin rounding the same way)
    lr, up, bias = torch.randn(m, rank), torch.randn(n, rank).bfloat16().to(up_dtype), torch.randn(n)
    a, b, sa, sb, lr, up, bias = (t.to(device) for t in (a, b, sa, sb, lr, up, bias))
    cfg = GemmConfig(32, 32, g, 2, 4, 2, persistent=True)
    got = grouped_gemm(a, b, sa, sb, g, lr, up, bias, out_dtype=torch.float32, config=cfg)
    ref = grouped_gemm_torch(a, b, sa, sb, g, lr, up, bias, out_dtype=torch.float32)
    assert sqnr_db(ref, got) > (SQNR_FP32_REORDER_DB if device == "cpu" else SQNR_GPU_ACCUMULATE_DB)


@pytest.mark.gpu
@needs_cuda
def test_grouped_gemm_gpu():
    from fourbit.kernels.gemm_grouped import grouped_gemm, grouped_gemm_torch

    m, n, k, g = 1000, 776, 3072, 64
    a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    sa = torch.rand(k // g, m, device="cuda") + 0.1
    sb = torch.rand(k // g, n, device="cuda") + 0.1
    got = grouped_gemm(a, b, sa, sb, g, out_dtype=torch.float32)
    ref = grouped_gemm_torch(a, b, sa, sb, g, out_dtype=torch.float32)
    assert sqnr_db(ref, got) > SQNR_FP32_REORDER_DB

