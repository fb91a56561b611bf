"""``kernels/row_amax``: the GEMM epilogue's row maxima of the next layer's smoothed input.

What the next layer needs is the maximum of exactly the values it will read, so the check is bit-exact against the
GEMM's own output (``row_amax_torch`` of it), whatever the summation order; and the twin ``scaled_gemm_torch`` gives
the same maxima from its own output to its rounding.
"""
from __future__ import annotations

import pytest
import torch

from .kernel_helpers import SQNR_FP32_REORDER_DB, SQNR_GPU_ACCUMULATE_DB, gemm_operands, sqnr_db

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _exact(y, req_mult, lo, hi):
    return (y[:, lo:hi].float() * req_mult[: hi - lo]).abs().amax(1)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_scaled_gemm_row_amax_matches_twin(device, out_dtype):
    """Column ranges inside one tile, across tiles and to the end; with a GELU on another range; ragged rows; a
    stream-K config: the maxima of the kernel's own rounded output, bit for bit, and the twin's to its rounding;
    maxima already in ``out`` are kept where larger."""
    from fourbit.kernels.activation import OutputActivation
    from fourbit.kernels.gemm import GemmConfig, scaled_gemm, scaled_gemm_torch
    from fourbit.kernels.row_amax import RowAmax

    m, n, k, r = 70, 136, 256, 20
    a, b = (t.to(device) for t in gemm_operands(torch.float8_e4m3fn, m, n, k))
    g = torch.Generator().manual_seed(3)
    sa, sb = (torch.rand(m, generator=g) * 0.1 + 0.05).to(device), (torch.rand(n, generator=g) + 0.5).to(device)
    lr, up = torch.randn(m, r, generator=g).to(device), torch.randn(n, r, generator=g).bfloat16().float().to(device)
    bias = torch.randn(n, generator=g).to(device)
    mult = (torch.rand(n, generator=g) + 0.25).to(device)
    configs = [GemmConfig(32, 32, 64, 2, 4, 2, persistent=True),
               GemmConfig(32, 32, 64, 2, 4, 2, persistent=True, stream_k=True)]
    for cfg in configs:
        for lo, hi, act in ((40, 136, OutputActivation("gelu_tanh", 40)), (3, 29, None), (17, 90, None)):
            req = RowAmax.zeros(m, mult, lo, hi)
            y = scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=out_dtype, config=cfg, act=act, next_amax=req)
            want = _exact(y, mult, lo, hi)
            assert torch.equal(req.out, want), (cfg, lo, hi)
            assert (want > 0).all()
            twin = RowAmax.zeros(m, mult.cpu(), lo, hi)
            scaled_gemm_torch(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), lr.cpu(), up.cpu(), bias.cpu(),
                              out_dtype=out_dtype, act=act, next_amax=twin)
            if out_dtype == torch.bfloat16:  # the maxima of outputs one bf16 rounding apart
                assert torch.allclose(req.out.cpu(), twin.out, rtol=2 ** -7, atol=1e-6)
            else:  # the outputs' own bound: the summation order (CPU), the GPU's accumulation and tf32 branch
                assert sqnr_db(twin.out, req.out.cpu()) > (SQNR_FP32_REORDER_DB if device == "cpu"
                                                            else SQNR_GPU_ACCUMULATE_DB)
    # combined with what out holds: a larger value stays, smaller ones are replaced
    seed = torch.zeros(m, device=device)
    seed[5] = 1e6
    req = RowAmax(seed, mult, 3, 29)
    y = scaled_gemm(a, b, sa, sb, lr, up, bias, config=configs[0], next_amax=req)
    want = _exact(y, mult, 3, 29)
    want[5] = 1e6
    assert torch.equal(req.out, want)


def test_row_amax_refuses_bad_requests():
    from fourbit.kernels.gemm import scaled_gemm
    from fourbit.kernels.row_amax import RowAmax

    a, b = gemm_operands(torch.float8_e4m3fn, 8, 32, 64)
    mult = torch.ones(32)
    for req, match in ((RowAmax.zeros(8, mult, 10, 40), "not a range"),
                       (RowAmax(torch.zeros(7), mult, 0, 8), r"\(8,\) float32"),
                       (RowAmax.zeros(8, torch.ones(4), 0, 8), "at least 8"),
                       (RowAmax.zeros(8, mult.double(), 0, 8), "float32")):
        with pytest.raises(ValueError, match=match):
            scaled_gemm(a, b, next_amax=req)


@pytest.mark.gpu
@needs_cuda
def test_scaled_gemm_row_amax_gpu():
    """Default configs (128 x 256 tiles, TMA store; stream-K from K = 8192; few tiles at 512 rows) with the fused
    GELU on a sibling group's last columns, FLUX.1-like: the maxima of the kernel's own bf16 output, bit for bit."""
    from fourbit.kernels.activation import OutputActivation
    from fourbit.kernels.gemm import scaled_gemm, scaled_gemm_torch
    from fourbit.kernels.row_amax import RowAmax

    for m, n, k, lo in ((1000, 1536, 512, 512), (512, 2048, 1024, 0), (1500, 1280, 8192, 256)):
        g = torch.Generator().manual_seed(m)
        a = torch.randint(-8, 8, (m, k), generator=g).float().to(torch.float8_e4m3fn).cuda()
        b = torch.randint(-8, 8, (n, k), generator=g).float().to(torch.float8_e4m3fn).cuda()
        sa, sb = (torch.rand(m, generator=g) * 0.05).cuda(), (torch.rand(n, generator=g) + 0.5).cuda()
        lr, up = torch.randn(m, 32, generator=g).cuda(), torch.randn(n, 32, generator=g).bfloat16().float().cuda()
        mult = (torch.rand(n - lo, generator=g) + 0.25).cuda()
        act = OutputActivation("gelu_tanh", lo)
        req = RowAmax.zeros(m, mult, lo, n)
        y = scaled_gemm(a, b, sa, sb, lr, up, act=act, next_amax=req)
        assert torch.equal(req.out, _exact(y, mult, lo, n)), (m, n, k)
        ref = scaled_gemm(a, b, sa, sb, lr, up, act=act)
        assert torch.equal(y, ref)  # the request changes nothing else
        twin = RowAmax.zeros(m, mult, lo, n)
        scaled_gemm_torch(a, b, sa, sb, lr, up, act=act, next_amax=twin)
        assert torch.allclose(req.out, twin.out, rtol=2 ** -6, atol=1e-6)
