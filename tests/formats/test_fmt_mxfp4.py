"""mxfp4: e2m1 codes with E8M0 power-of-two scales per 32 (OCP MX v1.0)."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from .fmt_helpers import KINDS, local_half_step, make_input, tol
from fourbit.formats import E2M1_VALUES, QuantizedTensor, make_format

E2M1_MAGS = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
FMT = make_format("mxfp4")


def scale_of(q):
    """X = 2^(byte - 127) per element, (R, K) float64."""
    return (2.0 ** (q.scales.double() - 127)).repeat_interleave(32, dim=1)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS), log10_scale=st.floats(-30.0, 30.0))
def test_scales_and_error(seed, kind, log10_scale):
    x = make_input(seed, 3, 96, kind, log10_scale, g=32)
    q = FMT.quantize(x)
    y = FMT.dequantize(q).double()
    X = scale_of(q)
    amax = x.reshape(3, 3, 32).abs().amax(-1).double()
    e = q.scales.double() - 127
    # X = 2^(floor(log2 amax) - 2): 2^(e+2) <= amax < 2^(e+3), exactly (all-zero groups: e = -127)
    nz = amax > 0
    assert ((2.0 ** (e + 2) <= amax) & (amax < 2.0 ** (e + 3)))[nz].all()
    assert (e[~nz] == -127).all()
    v = x.abs().double() / X  # < 8
    err = (x.double() - y).abs()
    inside = v <= 6
    assert (err <= X * local_half_step(v, E2M1_MAGS) + tol(x))[inside].all()
    assert (y.abs() == 6 * X)[~inside].all()  # beyond 6: saturates to +-6 X, as the spec says


def test_scales_are_powers_of_two():
    x = make_input(1, 4, 128, "heavy", 0.0)
    q = FMT.quantize(x)
    assert q.scales.dtype == torch.uint8 and (q.scales < 255).all()
    one = torch.full_like(q.codes, 2)  # code 2 is e2m1 1.0, so this dequantizes to X itself
    X = FMT.dequantize(QuantizedTensor(one, q.scales))
    m, _ = torch.frexp(X)
    assert (m == 0.5).all()  # mantissa 0.5: an exact power of two


def test_spec_examples():
    x = torch.zeros(1, 64)
    x[0, :4] = torch.tensor([7.5, 3.0, -0.7, 0.2])  # amax 7.5: floor(log2) = 2, X = 1, 7.5 saturates to 6
    x[0, 32:34] = torch.tensor([0.75, -0.3])  # amax 0.75: floor(log2) = -1, X = 2^-3
    q = FMT.quantize(x)
    assert q.scales.tolist() == [[127, 124]]
    y = FMT.dequantize(q)
    assert y[0, :4].tolist() == [6.0, 3.0, -0.5, 0.0]
    assert y[0, 32:34].tolist() == [0.75, -0.25]


def test_grid_is_exact():
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (4, 64), generator=gen)
    codes[:, ::32] = 7  # a 6 in every group sets X
    x = E2M1_VALUES[codes] * 2.0 ** torch.randint(-100, 100, (4, 1), generator=gen).double().float()
    assert torch.equal(FMT.fake_quantize(x), x)


def test_extreme_magnitudes():
    x = torch.tensor([[3e38] + [1e-45] * 31])  # floor(log2 3e38) = 127: X = 2^125, 3e38 / X = 7.05 -> 6
    y = FMT.fake_quantize(x)
    assert FMT.quantize(x).scales.tolist() == [[127 + 125]]
    assert y[0, 0].item() == 6 * 2.0 ** 125 and (y[0, 1:] == 0).all()
    tiny = torch.full((1, 32), 2.0 ** -140)  # floor(log2) - 2 = -142 clamps to E8M0's -127: flushed to 0
    q = FMT.quantize(tiny)
    assert q.scales.tolist() == [[0]] and (FMT.dequantize(q) == 0).all()


def test_bits_per_element():
    assert FMT.bits_per_element(4096) == 4.25
