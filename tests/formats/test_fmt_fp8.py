"""fp8: e4m3 values, one fp32 scale max|x| / 448 per row (W8A8 on FP8 hardware)."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from .fmt_helpers import KINDS, make_input, sqnr_db
from fourbit.formats import make_format
from fourbit.formats.fp8 import NAN_CODES


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 300), kind=st.sampled_from(KINDS),
       log10_scale=st.floats(-30.0, 30.0))
def test_row_scale_and_relative_error(seed, k, kind, log10_scale):
    fmt = make_format("fp8")
    x = make_input(seed, 3, k, kind, log10_scale, g=k)
    q = fmt.quantize(x)
    assert q.scales.shape == (3, 1) and q.scales.dtype == torch.float32 and q.row_scale is None
    assert torch.equal(q.scales, x.abs().amax(1, keepdim=True) / 448)
    assert not any((q.codes == c).any() for c in NAN_CODES)
    # e4m3 normals keep 3 mantissa bits: |error| <= 2^-4 |x| (+ rounding slack), subnormals 2^-10 of the scale
    err = (x - fmt.dequantize(q)).abs().double()
    bound = 2.0 ** -4 * x.abs().double() * (1 + 1e-6) + 2.0 ** -10 * q.scales.double() * (1 + 1e-6) + 1e-30
    assert (err <= bound).all()


def test_codes_are_the_e4m3_bits_of_x_over_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 77, generator=gen) * torch.tensor([[1.0], [1e-20], [3e3], [1.0], [0.0]])
    x[3, :5] = torch.tensor([-0.0, 1e-9, -1e-9, 448.0, -448.0])
    fmt = make_format("fp8")
    q = fmt.quantize(x)
    s = x.abs().amax(1, keepdim=True) / 448
    y = x * (1.0 / torch.where(s == 0, torch.ones_like(s), s))
    expect = y.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)  # torch's own rounding (CPU)
    expect = torch.where(expect == 0x80, torch.zeros_like(expect), expect)  # zeros are +0 here
    assert torch.equal(q.codes, expect)
    assert q.codes[3, 0] == 0 and q.codes[3, 2] == 0  # -0.0 and a negative that rounds to zero: +0
    assert torch.equal(q.codes[4], torch.zeros(77, dtype=torch.uint8)) and q.scales[4, 0] == 0
    w8, sc = fmt.to_fp8_operand(q)
    assert torch.equal(w8.float() * sc, fmt.dequantize(q))


def test_grid_values_are_exact():
    vals = torch.tensor([v for v in range(256) if v not in NAN_CODES], dtype=torch.uint8)
    grid = vals.view(torch.float8_e4m3fn).float().reshape(1, -1)  # every e4m3 value, max 448
    fmt = make_format("fp8")
    q = fmt.quantize(grid)
    assert torch.equal(fmt.dequantize(q), grid)


def test_outliers_favour_fp8_over_int8():
    """A row with one channel 100x the others: int8's step follows the outlier, fp8's error follows each value."""
    x = make_input(2, 16, 512, "normal", 0.0)
    x[:, 7] *= 100.0
    assert sqnr_db(x, make_format("fp8").fake_quantize(x)) > sqnr_db(x, make_format("int8").fake_quantize(x))


def test_bits_per_element():
    assert make_format("fp8").bits_per_element(4096) == 8 + 32 / 4096
