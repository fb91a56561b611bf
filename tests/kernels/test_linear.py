"""``kernels/linear``: the "triton" (speed) and "triton-memory" kernels of a quantized layer against
``kernels.reference.quant_linear_reference``, the registry, the speed cache, the kernel mode in checkpoints.

Layers with fp32 activations: ``SQNR_FP32_REORDER_DB`` (same codes, fp32 sums); bf16 activations in the
interpreter: ``SQNR_BF16_TRUNCATED_DB``; on a GPU: ``SQNR_BF16_OUTPUT_DB``, speed and memory mode identical bits.
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fourbit
from fourbit.nn import set_kernel

from .kernel_helpers import (PAIRS, SQNR_BF16_TRUNCATED_DB, SQNR_FP32_REORDER_DB,
                             speed_equals_memory_near_reference, sqnr_db)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _quantized_linear(wf, af, dtype, k=200, n=96, kernel="reference"):
    lin = nn.Linear(k, n).to(dtype)
    x = torch.randn(3, 17, k).to(dtype)
    cfg = fourbit.SVDQuantConfig(weights=wf, activations=af, rank=20, alpha=0.5, kernel=kernel)
    model = nn.Sequential(lin)
    fourbit.quantize(model, cfg, forward_loop=lambda mm: mm(x), progress=False, verbose=False)
    return model, x


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("wf,af", PAIRS, ids=[f"w{w}-a{a}" for w, a in PAIRS])
def test_layer_fp32_matches_reference(wf, af):
    model, x = _quantized_linear(wf, af, torch.float32)
    ref = model(x)
    for kernel in ("triton", "triton-memory"):
        set_kernel(model, kernel)
        got = model(x)
        assert sqnr_db(ref, got) > SQNR_FP32_REORDER_DB, kernel
    set_kernel(model, "reference")


@pytest.mark.usefixtures("interpret")
def test_layer_bf16_within_output_rounding():
    model, x = _quantized_linear("int4p2", "int4p2", torch.bfloat16)
    ref = model(x).float()
    set_kernel(model, "triton")
    got = model(x).float()
    assert got.dtype == torch.float32 and sqnr_db(ref, got) > SQNR_BF16_TRUNCATED_DB


@pytest.mark.usefixtures("interpret")
def test_lowrank_variants():
    from fourbit.kernels.linear import linear_forward
    from fourbit.kernels.reference import low_rank_branch, prepare_activation

    model, x = _quantized_linear("int4p2", "int4p2", torch.float32)
    layer, x2 = model[0], x.reshape(-1, 200)
    fused = linear_forward(layer, x2, lowrank="fused")
    unfused = linear_forward(layer, x2, lowrank="unfused")
    none = linear_forward(layer, x2, lowrank="none")
    branch = low_rank_branch(layer, prepare_activation(layer, x2))
    assert sqnr_db(fused, unfused) > SQNR_FP32_REORDER_DB
    assert sqnr_db(fused, none + branch) > SQNR_FP32_REORDER_DB


@pytest.mark.usefixtures("interpret")
def test_unsupported_pair_falls_back_to_reference_with_warning():
    model, x = _quantized_linear("nf4", "int4", torch.float32)
    ref = model(x)
    set_kernel(model, "triton")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model(x)
    assert torch.equal(got, ref)


@pytest.mark.usefixtures("interpret")
def test_speed_cache_invalidated_by_in_place_change():
    model, x = _quantized_linear("int4p2", "int4p2", torch.float32, kernel="triton")
    layer = model[0]
    y0 = model(x)
    with torch.no_grad():
        layer.bias.add_(1.0)  # in place: same storage, new version
    y1 = model(x)
    assert torch.allclose(y1, y0 + 1.0, atol=1e-5)


@pytest.mark.usefixtures("interpret")
def test_kernel_mode_recorded_in_checkpoint(tmp_path):
    model, x = _quantized_linear("int4p2", "int4p2", torch.float32, kernel="triton-memory")
    y = model(x)
    path = tmp_path / "m.fourbit.safetensors"
    fourbit.save(model, str(path))
    fresh = nn.Sequential(nn.Linear(200, 96))
    fourbit.load(fresh, str(path))
    assert fresh[0].kernel == "triton-memory"
    assert torch.equal(fresh(x), y)


@pytest.mark.usefixtures("interpret")
def test_import_fourbit_does_not_import_triton():
    code = "import sys, fourbit, fourbit.kernels; assert 'triton' not in sys.modules; " \
           "assert {'triton', 'triton-cublas', 'triton-memory'} <= set(fourbit.kernels.available_kernels())"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("wf,af", PAIRS, ids=[f"w{w}-a{a}" for w, a in PAIRS])
def test_layers_gpu(wf, af):
    lin = nn.Linear(1000, 777).bfloat16().cuda()
    x = torch.randn(2, 300, 1000, device="cuda").bfloat16()
    model = nn.Sequential(lin)
    cfg = fourbit.SVDQuantConfig(weights=wf, activations=af, rank=32, alpha=0.5)
    fourbit.quantize(model, cfg, forward_loop=lambda mm: mm(x), progress=False, verbose=False)
    speed_equals_memory_near_reference(model, x)

