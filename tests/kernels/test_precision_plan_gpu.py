"""fourbit.plan_precision on the GPU: the Triton kernels timed against bf16 in CUDA graphs, then the planned mix
quantized and run (the CPU tests, tests/test_precision_plan.py, cover the choice with given timings)."""
import pytest
import torch
from torch import nn

import fourbit

from .kernel_helpers import db, sqnr_db

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8 = {"weights": "fp8", "activations": "fp8"}


@pytest.mark.gpu
@needs_cuda
def test_plan_precision_times_the_triton_kernels_gpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1152, 3456), nn.GELU(), nn.Linear(3456, 1152)).cuda().bfloat16()
    x = torch.randn(4096, 1152, device="cuda", dtype=torch.bfloat16)
    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=32, kernel="triton")
    plan = fourbit.plan_precision(model, cfg, lambda m: m(x), fallbacks=[FP8], rounds=5, progress=False)
    assert [lp.name for lp in plan.layers] == ["0", "2"]
    for lp in plan.layers:
        assert lp.rows == {4096: 1} and not lp.errors, lp.errors
        assert set(lp.ms) == {"16-bit", "config", "weights=fp8, activations=fp8"}
        assert all(0 < t < 10 for t in lp.ms.values()), lp.ms  # ms for one call of a 4096-row layer
    assert plan.environment["device"] == torch.cuda.get_device_name()
    if plan.counts().get("16-bit", 0) == len(plan.layers):  # neither layer faster in low precision here
        with pytest.raises(ValueError, match="kept 16-bit by its overrides"):
            fourbit.quantize(model, plan.config, lambda m: m(x[:512]), progress=False, verbose=False)
        return
    ref = model(x).float()
    fourbit.quantize(model, plan.config, lambda m: m(x[:512]), progress=False, verbose=False)
    out = model(x).float()
    assert torch.isfinite(out).all() and (out - ref).norm() / ref.norm() < 0.2


@pytest.mark.gpu
@needs_cuda
def test_plan_precision_picks_the_kernel_per_layer_gpu():
    """kernels=("triton", "triton-cublas"): each layer timed with its GEMM on Triton and on cuBLAS; a planned layer
    runs the faster one (from the checkpoint's per-layer kernel), and the mix computes what the model computes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1152, 4608), nn.GELU(), nn.Linear(4608, 1152)).cuda().bfloat16()
    x = torch.randn(4096, 1152, device="cuda", dtype=torch.bfloat16)
    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=32, kernel="triton")
    plan = fourbit.plan_precision(model, cfg, lambda m: m(x), kernels=("triton", "triton-cublas"), rounds=5,
                                  progress=False, min_speedup=1e-6)  # keep both layers in 4 bits: test the kernels
    for lp in plan.layers:
        assert set(lp.ms) == {"16-bit", "config @ triton", "config @ triton-cublas"} and not lp.errors, lp.errors
    # the first layer timed with its GELU (Triton: in the epilogue; cuBLAS and bf16: after), the second alone
    assert [lp.activation for lp in plan.layers] == [["gelu", 0, 4608], None]
    chosen = [lp.choice.split(" @ ")[1] for lp in plan.layers]
    fourbit.quantize(model, plan.config, lambda m: m(x[:512]), progress=False, verbose=False)
    assert [model[0].kernel, model[2].kernel] == chosen
    with torch.no_grad():
        h = model[1](model[0](x))
        for layer, inp in ((model[0], x), (model[2], h)):  # each layer against the reference kernel, same input
            got = layer(inp).float()
            kernel, layer.kernel = layer.kernel, "reference"
            want = layer(inp).float()
            layer.kernel = kernel
            # identical codes; the bf16 output's rounding and, on cuBLAS, the folded branch (< 2e-3 each)
            assert sqnr_db(want, got) > db(4e-3), (kernel, sqnr_db(want, got))


@pytest.mark.gpu
@needs_cuda
def test_plan_precision_times_a_3x3_convolution_gpu():
    """A UNet-like 3x3 convolution timed at its input shape (the im2col W4A4 layer against cuDNN's bf16 conv)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(320, 320, 3, padding=1)).cuda().bfloat16()
    x = torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.bfloat16)
    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=32, kernel="triton")
    plan = fourbit.plan_precision(model, cfg, lambda m: m(x), rounds=5, progress=False)
    (lp,) = plan.layers
    assert lp.rows == {2 * 64 * 64: 1} and (lp.in_features, lp.out_features) == (320 * 9, 320)
    assert set(lp.ms) == {"16-bit", "config"} and not lp.errors, lp.errors
    assert all(0 < t < 10 for t in lp.ms.values()), lp.ms
