"""int8: symmetric, qmax 127, one fp32 scale per row by default."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from .fmt_helpers import KINDS, make_input, tol
from fourbit.formats import make_format


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 300), kind=st.sampled_from(KINDS),
       log10_scale=st.floats(-30.0, 30.0))
def test_per_row_error_within_half_step(seed, k, kind, log10_scale):
    fmt = make_format("int8")
    x = make_input(seed, 3, k, kind, log10_scale, g=k)
    q = fmt.quantize(x)
    assert q.scales.shape == (3, 1) and q.scales.dtype == torch.float32
    assert torch.equal(q.scales, x.abs().amax(1, keepdim=True) / 127)
    assert (q.codes.abs() <= 127).all()
    err = (x - fmt.dequantize(q)).abs().double()
    assert (err <= 0.5 * q.scales.double() + tol(x)).all()


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
def test_grouped(scale_dtype):
    fmt = make_format("int8", group_size=64, scale_dtype=scale_dtype)
    x = make_input(1, 4, 256, "outliers", -2.0)
    q = fmt.quantize(x)
    assert q.scales.shape == (4, 4) and q.scales.dtype == getattr(torch, scale_dtype)
    s = q.scales.float().repeat_interleave(64, dim=1)
    assert ((x - fmt.dequantize(q)).abs() <= 0.5 * s + tol(x).float()).all()


def test_grid_is_exact():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (4, 33), generator=gen, dtype=torch.int8)
    codes[:, 0] = 127
    x = codes.float() * torch.tensor([[1.0], [2.0 ** -20], [0.375], [1000.0]])
    q = make_format("int8").quantize(x)
    assert torch.equal(q.codes, codes) and torch.equal(make_format("int8").dequantize(q), x)


def test_bits_per_element():
    assert make_format("int8").bits_per_element(4096) == 8 + 32 / 4096
    assert make_format("int8", group_size=64, scale_dtype="float16").bits_per_element(4096) == 8.25
    assert make_format("int8").code_bits == 8 and make_format("int8").group_size is None
