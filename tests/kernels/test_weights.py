"""``kernels/weights``: ``expand_weight`` against ``expand_weight_torch``, bit for bit (packed codes and scales
to the GEMM's weight operand), on every weight format.
"""
from __future__ import annotations

import pytest
import torch

from fourbit.formats import make_format

from .conftest import bits
from .kernel_helpers import WEIGHT_FORMATS, hard_rows, ids

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name,kw", WEIGHT_FORMATS, ids=ids(WEIGHT_FORMATS))
@pytest.mark.parametrize("kp", [256, 384], ids=["k-whole-tile", "k-partial-tile"])
def test_expand_weight_bit_exact(device, name, kw, kp):
    from fourbit.kernels.weights import expand_weight, expand_weight_torch

    fmt = make_format(name, **kw)
    w = hard_rows(45, kp, seed=1).to(device)
    q = fmt.quantize(w)
    packed = fmt.pack(q.codes)
    got = expand_weight(packed, q.scales, q.row_scale, fmt, kp)
    ref = expand_weight_torch(packed, q.scales, q.row_scale, fmt, kp)
    assert torch.equal(bits(got.w), bits(ref.w))
    for a, b in ((got.col_scale, ref.col_scale), (got.group_scale, ref.group_scale)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    if name in ("int4p2", "fp4p2"):  # the operand times the row scale IS the format's dequantization
        deq = got.w.float() * got.col_scale[:, None]
        assert torch.equal(deq, fmt.dequantize(q))


@pytest.mark.parametrize("name", ["int4p2", "fp4", "int4"])
def test_expand_weight_group_not_a_power_of_two_bit_exact(device, name):
    """Group 48: the kernel that gathers the scale per byte (the main one needs power-of-two groups)."""
    from fourbit.kernels.weights import expand_weight, expand_weight_torch

    fmt = make_format(name, group_size=48)
    q = fmt.quantize(hard_rows(37, 384, seed=2).to(device))
    packed = fmt.pack(q.codes)
    got = expand_weight(packed, q.scales, q.row_scale, fmt, 384)
    assert torch.equal(bits(got.w), bits(expand_weight_torch(packed, q.scales, q.row_scale, fmt, 384).w))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name,kw", WEIGHT_FORMATS, ids=ids(WEIGHT_FORMATS))
def test_expand_weight_bit_exact_gpu(name, kw):
    from fourbit.kernels.weights import expand_weight, expand_weight_torch

    fmt = make_format(name, **kw)
    q = fmt.quantize(hard_rows(300, 1024, seed=1).cuda())
    packed = fmt.pack(q.codes)
    got = expand_weight(packed, q.scales, q.row_scale, fmt, 1024)
    ref = expand_weight_torch(packed, q.scales, q.row_scale, fmt, 1024)
    assert torch.equal(bits(got.w), bits(ref.w))

