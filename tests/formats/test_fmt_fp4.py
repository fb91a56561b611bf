"""fp4 (e2m1, e4m3 group scales, optional outer scale) and nvfp4 (group 16 under a per-tensor fp32 scale)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from .fmt_helpers import KINDS, local_half_step, make_input, tol
from fourbit.formats import E2M1_VALUES, QuantizedTensor, make_format, to_e4m3

E2M1_MAGS = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def effective_scale(fmt, q, k):
    g = fmt.group_for(k)
    s = q.scales.float().repeat_interleave(g, dim=1)  # (R, K)
    return s if q.row_scale is None else s * q.row_scale


def check_half_step(fmt, x):
    q = fmt.quantize(x)
    eff = effective_scale(fmt, q, x.shape[1]).double()
    v = x.abs().double() / torch.where(eff > 0, eff, 1)
    assert (v <= 7 + 1e-6).all()  # never saturates by more than the top half step (6 -> 7)
    err = (x - fmt.dequantize(q)).abs().double()
    assert (err <= eff * local_half_step(v, E2M1_MAGS) + tol(x)).all()
    return q


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), g=st.sampled_from([16, 32, 64]), kind=st.sampled_from(KINDS),
       log10_scale=st.floats(-7.0, 1.0), outer=st.sampled_from([None, "tensor", "row"]))
def test_fp4_error_within_half_step(seed, g, kind, log10_scale, outer):
    """Holds while group maxima stay below 6 * 448 (outer=None), including subnormal e4m3 scales."""
    fmt = make_format("fp4", group_size=g, outer_scale=outer)
    check_half_step(fmt, make_input(seed, 3, 2 * g, kind, log10_scale, g=g))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS), log10_scale=st.floats(-20.0, 20.0))
def test_nvfp4_error_within_half_step(seed, kind, log10_scale):
    """The per-tensor scale makes any magnitude work."""
    check_half_step(make_format("nvfp4"), make_input(seed, 4, 64, kind, log10_scale, g=16))


def test_fp4_scales_are_nearest_e4m3():
    x = make_input(1, 8, 256, "heavy", 0.0)
    q = make_format("fp4").quantize(x)
    amax = x.reshape(8, 8, 32).abs().amax(-1)
    assert q.scales.dtype == torch.float8_e4m3fn
    assert torch.equal(q.scales.float(), to_e4m3(amax / 6).float())  # normal range: no bump


def test_nvfp4_scales():
    x = make_input(2, 8, 256, "outliers", 1.0)
    fmt = make_format("nvfp4")
    q = fmt.quantize(x)
    t = x.abs().max() / (6 * 448)
    assert q.row_scale.shape == (1, 1) and q.row_scale.item() == t.item()
    amax = x.reshape(8, 16, 16).abs().amax(-1)
    assert torch.equal(q.scales.float(), to_e4m3(amax / 6 / t).float())
    s = q.scales.float()
    assert s.max() == 448 and torch.equal(to_e4m3(s).float(), s)  # exact e4m3 values, top group at 448


def test_subnormal_scale_is_bumped_up():
    # amax / 6 = 1.45 * 2^-9: nearest e4m3 is 2^-9, which would clip the max at 8.7 > 7; the next value is used
    x = torch.zeros(1, 32)
    x[0, 0] = 6 * 1.45 * 2.0 ** -9
    q = make_format("fp4").quantize(x)
    assert q.scales.float().item() == 2 * 2.0 ** -9
    assert q.scales.float().item() != to_e4m3(x.abs().max() / 6).float().item()


def test_codes_are_e2m1_bit_patterns():
    fmt = make_format("fp4", group_size=16)
    x = E2M1_VALUES.clone().reshape(1, 16)  # scale 1: amax 6 -> s = 1
    q = fmt.quantize(x)
    assert q.scales.float().item() == 1.0
    want = torch.arange(16, dtype=torch.uint8)
    want[8] = 0  # -0 encodes as +0
    assert torch.equal(q.codes[0], want) and torch.equal(fmt.dequantize(q)[0], x[0])


def test_grid_is_exact():
    fmt = make_format("fp4")
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (4, 128), generator=gen, dtype=torch.int64)
    codes[:, ::32] = 7  # every group holds 6 * s
    x = E2M1_VALUES[codes] * 2.0 ** torch.randint(-3, 4, (4, 1), generator=gen)
    assert torch.equal(fmt.fake_quantize(x), x)


def test_nvfp4_requantizes_its_own_output():
    """t = amax / 2688 is not a power of two, so NVFP4 values are exact only up to the fp32 rounding of t:
    quantizing a dequantized tensor again gives the same codes and values within 1 ulp."""
    fmt = make_format("nvfp4")
    x = make_input(4, 8, 128, "heavy", 0.0)
    q1 = fmt.quantize(x)
    y1 = fmt.dequantize(q1)
    q2 = fmt.quantize(y1)
    assert torch.equal(q2.codes, q1.codes) and torch.equal(q2.scales.float(), q1.scales.float())
    assert torch.allclose(fmt.dequantize(q2), y1, rtol=2.0 ** -22, atol=0)


def test_bits_per_element():
    assert make_format("fp4").bits_per_element(4096) == 4.25
    assert make_format("fp4", group_size=16).bits_per_element(4096) == 4.5
    assert make_format("fp4", outer_scale="row").bits_per_element(4096) == 4.25 + 32 / 4096
    assert make_format("nvfp4").bits_per_element(4096) == 4.5  # the per-tensor scale needs rows to amortise
    assert make_format("nvfp4").bits_per_element(4096, rows=1024) == 4.5 + 32 / (1024 * 4096)


def test_options():
    assert make_format("nvfp4").row_scale_shape(5) == (1, 1)
    assert make_format("fp4", outer_scale="row").row_scale_shape(5) == (5, 1)
    assert make_format("fp4").row_scale_shape(5) is None
    with pytest.raises(ValueError, match="outer_scale"):
        make_format("fp4", outer_scale="channel")
    with pytest.raises(ValueError, match="fixed group size"):
        make_format("nvfp4", group_size=32)
