"""The e2m1 grid, e2m1 rounding, e4m3 rounding and the exact power-of-two helper."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fourbit.formats import E2M1_MAX, E2M1_VALUES, E4M3_MAX, e2m1_decode, e2m1_encode, e2m1_round, to_e4m3
from fourbit.formats.base import cast_scale, next_up, pow2

# ---- e2m1 --------------------------------------------------------------------------------------


def e2m1_from_bits(code: int) -> float:
    """The OCP MX definition of an e2m1 bit pattern: s e1 e0 m, bias 1, exponent 0 subnormal."""
    s, e, m = code >> 3, (code >> 1) & 3, code & 1
    mag = 0.5 * m if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
    return -mag if s else mag


def test_e2m1_grid_is_the_spec():
    assert E2M1_VALUES.tolist() == [e2m1_from_bits(c) for c in range(16)]
    assert sorted(set(abs(v) for v in E2M1_VALUES.tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert E2M1_MAX == 6.0


def test_every_e2m1_value_roundtrips():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = e2m1_decode(codes)
    assert torch.equal(e2m1_round(vals), vals)
    enc = e2m1_encode(vals)
    assert torch.equal(enc[codes != 8], codes[codes != 8])
    assert enc[8] == 0  # -0 is encoded as +0
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(e2m1_round(vals.to(dt)), vals.to(dt))


def e2m1_reference(v: float) -> float:
    """Nearest e2m1 value, ties to the even magnitude index, saturating at 6."""
    mags = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda i: (abs(a - mags[i]), i % 2))
    return math.copysign(mags[best], v) if mags[best] else 0.0


def test_e2m1_ties_to_even():
    ties = {0.25: 0, 0.75: 1, 1.25: 1, 1.75: 2, 2.5: 2, 3.5: 4, 5.0: 4}
    for t, want in ties.items():
        got = e2m1_round(torch.tensor([t, -t]))
        assert got.tolist() == [want, -want], t
    assert e2m1_round(torch.tensor([6.5, 100.0, -1e30])).tolist() == [6, 6, -6]
    assert torch.isnan(e2m1_round(torch.tensor([float("nan")]))).all()


@settings(max_examples=300, deadline=None)
@given(st.floats(-10, 10, allow_nan=False, width=32))
def test_e2m1_round_matches_reference(v):
    assert e2m1_round(torch.tensor([v])).item() == e2m1_reference(v)


# ---- e4m3 --------------------------------------------------------------------------------------

def e4m3_table() -> torch.Tensor:
    """All finite non-negative e4m3 values by bit pattern 0..126 (0x7F is NaN)."""
    return torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def test_e4m3_table_is_the_spec():
    t = e4m3_table().double()
    assert t[1] == 2.0 ** -9 and t[7] == 7 * 2.0 ** -9 and t[8] == 2.0 ** -6 and t[-1] == E4M3_MAX
    assert (t[1:] > t[:-1]).all()


def e4m3_reference(v: float) -> float:
    """Nearest finite e4m3 value (ties to even bit pattern), saturating at 448."""
    t = e4m3_table().double().tolist()
    a = min(abs(v), E4M3_MAX)
    best = min(range(127), key=lambda i: (abs(a - t[i]), i % 2))
    return math.copysign(t[best], v)


def test_to_e4m3_every_value_and_midpoint():
    t = e4m3_table()
    assert torch.equal(to_e4m3(t).float(), t) and torch.equal(to_e4m3(-t).float(), -t)
    mids = (t[1:] + t[:-1]) / 2  # exact in fp32
    got = to_e4m3(mids).float()
    want = torch.tensor([e4m3_reference(m) for m in mids.tolist()])
    assert torch.equal(got, want)


def test_to_e4m3_saturates_and_keeps_nan():
    got = to_e4m3(torch.tensor([449.0, 1e6, -1e30, 464.0]))
    assert got.float().tolist() == [448, 448, -448, 448]
    assert torch.isnan(to_e4m3(torch.tensor([float("nan")])).float()).all()
    assert to_e4m3(torch.tensor([2.0 ** -11])).float().item() == 0.0  # below half the smallest subnormal


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(-500, 500, allow_nan=False, width=32), st.floats(-0.015625, 0.015625, width=32)))
def test_to_e4m3_matches_reference(v):
    assert to_e4m3(torch.tensor([v])).float().item() == e4m3_reference(v)


# ---- scales helpers ----------------------------------------------------------------------------

def test_pow2_is_exact_over_the_fp32_range():
    e = torch.arange(-149, 128)
    assert torch.equal(pow2(e), torch.tensor([2.0 ** i for i in e.tolist()], dtype=torch.float64).float())


MANTISSA_BITS = {torch.float8_e4m3fn: 3, torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}


@pytest.mark.parametrize("dtype", list(MANTISSA_BITS))
def test_next_up(dtype):
    m = MANTISSA_BITS[dtype]
    up = next_up(torch.tensor([0.0, 1.0, 3.0]).to(dtype)).double()
    assert up.tolist() == [torch.finfo(dtype).smallest_normal * 2.0 ** -m, 1 + 2.0 ** -m, 3 + 2.0 ** (1 - m)]


@pytest.mark.parametrize("dtype,qmax,limit", [(torch.float8_e4m3fn, 6.0, 7.0), (torch.float16, 7.0, 7.5)])
def test_cast_scale_never_clips_past_limit(dtype, qmax, limit):
    amax = torch.logspace(-12, 2, 4000, dtype=torch.float64).float()
    s = cast_scale(amax, qmax, limit, dtype).float()
    assert (amax <= limit * s * (1 + 1e-6)).all()  # the group maximum never clips by more than half a step
    # normal-range scales are the nearest value: nothing was bumped there
    normal = (amax / qmax) >= torch.finfo(dtype).smallest_normal
    assert torch.equal(s[normal], (amax[normal] / qmax).to(dtype).float())
    assert cast_scale(torch.zeros(3), qmax, limit, dtype).float().eq(0).all()
    assert cast_scale(torch.tensor([1e12]), qmax, limit, dtype).float().item() == torch.finfo(dtype).max
