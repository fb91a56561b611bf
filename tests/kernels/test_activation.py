"""``kernels/activation``: the output activation in the GEMM epilogue (``activate`` / ``activate_columns``)
against ``activation_torch`` through ``scaled_gemm_torch(act=...)``.
"""
from __future__ import annotations

import pytest
import torch

from .kernel_helpers import SQNR_FP32_REORDER_DB, gemm_operands, sqnr_db

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu", "silu"])
def test_scaled_gemm_output_activation_matches_twin(kind):
    """The activation on a column range in the epilogue (tiles wholly inside, outside and across the range's
    edges; open-ended range): the twin's fp32 result to 1e-5; with bf16 output, within one bf16 rounding."""
    from fourbit.kernels.activation import OutputActivation
    from fourbit.kernels.gemm import GemmConfig, scaled_gemm, scaled_gemm_torch

    m, n, k, r = 40, 136, 128, 20
    a, b = gemm_operands(torch.float8_e4m3fn, m, n, k)
    sa, sb = torch.rand(m) * 0.1 + 0.05, torch.rand(n) + 0.5
    lr, up, bias = torch.randn(m, r), torch.randn(n, r).bfloat16().float(), torch.randn(n)
    for act, cfg in ((OutputActivation(kind, 17, 90), GemmConfig(32, 32, 64, 2, 4, 2, persistent=True)),
                     (OutputActivation(kind, 40), None)):
        got = scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg, act=act)
        ref = scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, act=act)
        plain = scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
        lo, hi = act.bounds(n)
        assert torch.equal(got[:, :lo], scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32,
                                                    config=cfg)[:, :lo])
        assert not torch.allclose(ref[:, lo:hi], plain[:, lo:hi])  # the activation did something
        assert sqnr_db(ref, got) > SQNR_FP32_REORDER_DB
        got16 = scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.bfloat16, config=cfg, act=act).float()
        assert ((got16 - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all()  # the interpreter truncates to bf16
    with pytest.raises(ValueError, match="not one of"):
        OutputActivation("relu")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu", "silu"])
def test_scaled_gemm_output_activation_gpu(kind):
    """The epilogue activation on a column range, at the default (128 x 256, TMA store) and few-tile configs:
    fp32 output the twin's to 1e-5; bf16 output within one rounding of the fp32 twin (and, for gelu_tanh, the fast
    tanh's error)."""
    from fourbit.kernels.activation import TANH_APPROX_ERR, OutputActivation
    from fourbit.kernels.gemm import scaled_gemm, scaled_gemm_torch

    for m, n, k in ((1000, 1536, 512), (77, 640, 256), (2200, 1280, 256)):  # the last: test_fusion's sibling group
        g = torch.Generator().manual_seed(m)
        a = torch.randint(-8, 8, (m, k), generator=g).float().to(torch.float8_e4m3fn).cuda()
        b = torch.randint(-8, 8, (n, k), generator=g).float().to(torch.float8_e4m3fn).cuda()
        sa, sb = (torch.rand(m, generator=g) * 0.05).cuda(), (torch.rand(n, generator=g) + 0.5).cuda()
        # the branch's factors exact in tf32 (the epilogue's up-projection dot), so only the summation order differs
        lr = torch.randn(m, 32, generator=g).bfloat16().float().cuda()
        up = (torch.randn(n, 32, generator=g) * 0.1).bfloat16().float().cuda()
        act = OutputActivation(kind, 300, n - 100)
        ref = scaled_gemm_torch(a, b, sa, sb, lr, up, None, out_dtype=torch.float32, act=act)
        got = scaled_gemm(a, b, sa, sb, lr, up, None, out_dtype=torch.float32, act=act)
        assert sqnr_db(ref, got) > SQNR_FP32_REORDER_DB
        # the activation changes nothing else: the columns outside its range are the plain GEMM's, bit for bit (the
        # same tiles and accumulation order with and without the epilogue activation)
        plain = scaled_gemm(a, b, sa, sb, lr, up, None, out_dtype=torch.float32)
        lo, hi = act.bounds(n)
        assert torch.equal(got[:, :lo], plain[:, :lo]) and torch.equal(got[:, hi:], plain[:, hi:])
        got16 = scaled_gemm(a, b, sa, sb, lr, up, None, out_dtype=torch.bfloat16, act=act).float()
        # one bf16 rounding; gelu_tanh on 16-bit outputs also the GPU's tanh.approx: |y| * TANH_APPROX_ERR / 2
        fast = (plain.abs() * TANH_APPROX_ERR / 2) if kind == "gelu_tanh" else 0.0
        assert ((got16 - ref).abs() <= ref.abs() * 2 ** -8 * 1.01 + fast + 1e-6).all()



@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu", "silu"])
def test_epilogue_activation_compiles_for_hopper(compiled, kind):
    """The compiled form of each epilogue activation (gelu_tanh: torch's formula with libdevice's tanhf, code the
    interpreter never runs) compiles for sm_90 on this machine, with a fused multiply-add where torch's CUDA kernel
    has one (x + 0.044715 x^3)."""
    import triton
    import triton.language as tl

    from fourbit.kernels.activation import CODES, activate

    from .conftest import compile_for_hopper

    @triton.jit
    def apply(x_ptr, y_ptr, CODE: tl.constexpr):
        offs = tl.arange(0, 128)
        tl.store(y_ptr + offs, activate(tl.load(x_ptr + offs), CODE))

    kernel = compile_for_hopper(apply, dict(x_ptr="*fp32", y_ptr="*fp32"), dict(CODE=CODES[kind]), num_warps=1)
    ptx = kernel.asm["ptx"]
    assert "st.global" in ptx
    if kind == "gelu_tanh":
        assert "0f3D372713" in ptx and "fma.rn.f32" in ptx  # 0.044715 as fp32, multiplied and added in one rounding
        assert "tanh.approx" not in ptx  # fp32: libdevice's tanhf (eager's values)

    @triton.jit
    def apply_fast(x_ptr, y_ptr, CODE: tl.constexpr):  # what a 16-bit output's epilogue runs
        offs = tl.arange(0, 128)
        tl.store(y_ptr + offs, activate(tl.load(x_ptr + offs), CODE, True))

    fast = compile_for_hopper(apply_fast, dict(x_ptr="*fp32", y_ptr="*fp32"), dict(CODE=CODES[kind]), num_warps=1)
    assert ("tanh.approx.f32" in fast.asm["ptx"]) == (kind == "gelu_tanh")
