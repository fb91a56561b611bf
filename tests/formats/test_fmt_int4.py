"""int4: symmetric per-group int4 with fp16/bf16 scales."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from .fmt_helpers import KINDS, make_input, tol
from fourbit.formats import QuantizedTensor, make_format


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), g=st.sampled_from([8, 32, 64, 128]), kind=st.sampled_from(KINDS),
       log10_scale=st.floats(-6.0, 4.0), scale_dtype=st.sampled_from(["float16", "bfloat16"]))
def test_error_within_half_step(seed, g, kind, log10_scale, scale_dtype):
    fmt = make_format("int4", group_size=g, scale_dtype=scale_dtype)
    x = make_input(seed, 3, 2 * g, kind, log10_scale, g=g)
    assume(scale_dtype == "bfloat16" or x.abs().max() <= 7 * 65504)  # fp16 scales saturate beyond (tested below)
    q = fmt.quantize(x)
    s = q.scales.float().repeat_interleave(g, dim=1)  # (R, K)
    err = (x - fmt.dequantize(q)).abs().double()
    assert (err <= 0.5 * s.double() + tol(x)).all()


def test_scale_is_nearest_fp16_of_amax_over_7():
    x = make_input(0, 4, 256, "heavy", 0.0)
    q = make_format("int4").quantize(x)
    amax = x.reshape(4, 4, 64).abs().amax(-1)
    assert torch.equal(q.scales, (amax / 7).half())


def test_grid_is_exact():
    """Tensors already on the grid (code * s, with a +-7 in each group) come back bit for bit.
    (-8 is a valid code but never chosen: |x| <= 7 s by construction of s.)"""
    fmt = make_format("int4", group_size=16)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-7, 8, (5, 32), generator=gen, dtype=torch.int8)
    codes[:, ::16] = torch.tensor([7, -7], dtype=torch.int8)  # each group's max is 7 * s
    s = torch.tensor([1.0, 0.5, 3.0, 2.0 ** -10, 1024.0]).half()
    x = codes.float() * s.float().unsqueeze(1)
    q = fmt.quantize(x)
    assert torch.equal(fmt.dequantize(q), x) and torch.equal(q.codes, codes)


def test_saturating_fp16_scale_gives_no_nan():
    x = torch.full((1, 64), 1e7)
    x[0, 1] = -3e6
    y = make_format("int4").fake_quantize(x)
    assert torch.isfinite(y).all() and y[0, 0] == 7 * 65504


def test_tiny_groups_keep_half_step():
    x = torch.full((1, 64), 3e-7)  # amax / 7 is an fp16 subnormal
    q = make_format("int4").quantize(x)
    assert ((x - make_format("int4").dequantize(q)).abs() <= 0.5 * q.scales.float()).all()


def test_pack_layout():
    packed = make_format("int4").pack(torch.tensor([[1, -1, -8, 7]], dtype=torch.int8))
    assert packed.tolist() == [[0xF1, 0x78]]  # low nibble first, two's complement


@pytest.mark.parametrize("g,scale_dtype,bits", [(64, "float16", 4.25), (64, "bfloat16", 4.25), (32, "float16", 4.5),
                                                (128, "float16", 4.125)])
def test_bits_per_element(g, scale_dtype, bits):
    assert make_format("int4", group_size=g, scale_dtype=scale_dtype).bits_per_element(4096) == bits


def test_bad_scale_dtype():
    with pytest.raises(ValueError, match="scale_dtype"):
        make_format("int4", scale_dtype="float32")
