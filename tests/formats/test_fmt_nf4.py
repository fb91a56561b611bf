"""nf4: QLoRA NormalFloat4 code book with an absmax scale per group of 64."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from .fmt_helpers import KINDS, local_half_step, make_input, tol
from fourbit.formats import NF4_VALUES, make_format


def test_code_book_is_qlora_nf4():
    """16 values: N(0, 1) quantiles (QLoRA's construction, offset 0.9677083), 7 negative, an exact 0,
    8 positive, normalised to [-1, 1]."""
    v = NF4_VALUES
    assert v.shape == (16,) and (v[1:] > v[:-1]).all()
    assert v[0] == -1 and v[7] == 0 and v[15] == 1 and (v < 0).sum() == 7 and (v > 0).sum() == 8
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    ref = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    assert torch.allclose(v.double(), ref / ref.max(), atol=1e-6, rtol=0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), g=st.sampled_from([16, 64, 128]), kind=st.sampled_from(KINDS),
       log10_scale=st.floats(-30.0, 30.0))
def test_nearest_code_and_error_bound(seed, g, kind, log10_scale):
    """|x - x^| <= s * (c[i+1] - c[i]) / 2 for the code values c[i] <= x/s <= c[i+1] (<= 0.152 s overall)."""
    fmt = make_format("nf4", group_size=g)
    x = make_input(seed, 3, 2 * g, kind, log10_scale, g=g)
    q = fmt.quantize(x)
    s = q.scales.double().repeat_interleave(g, dim=1)
    assert torch.equal(q.scales, x.reshape(3, 2, g).abs().amax(-1))  # fp32 absmax
    v = x.double() / torch.where(s > 0, s, 1)
    err = (x - fmt.dequantize(q)).abs().double()
    assert (err <= s * local_half_step(v, NF4_VALUES) + tol(x)).all()
    assert (err <= 0.152 * s + tol(x)).all()
    # the code is the nearest entry of the code book (brute force)
    d = (v.unsqueeze(-1) - NF4_VALUES.double()).abs()  # (R, K, 16)
    chosen = d.gather(-1, q.codes.long().unsqueeze(-1)).squeeze(-1)
    assert (chosen <= d.amin(-1) + 1e-6).all()


def test_grid_is_exact_and_ties_go_down():
    fmt = make_format("nf4", group_size=16)
    x = NF4_VALUES.reshape(1, 16) * 0.75
    q = fmt.quantize(x)
    assert q.codes.tolist() == [list(range(16))] and torch.equal(fmt.dequantize(q), x)
    mid = ((NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2)
    x = torch.cat([mid, torch.ones(1)]).reshape(1, 16)  # the 1.0 pins s = 1
    assert make_format("nf4", group_size=16).quantize(x).codes[0, :15].tolist() == list(range(15))


def test_scale_dtypes_and_bits():
    assert make_format("nf4").bits_per_element(4096) == 4.5
    fmt = make_format("nf4", scale_dtype="float16")
    assert fmt.bits_per_element(4096) == 4.25 and fmt.scale_dtype == torch.float16
    x = make_input(2, 2, 128, "normal", -5.0)  # amax ~ 3e-5: fp16 subnormal scale, still within the bound
    q = fmt.quantize(x)
    s = q.scales.double().repeat_interleave(64, dim=1)
    err = (x - fmt.dequantize(q)).abs().double()
    assert (err <= s * local_half_step(x.double() / s, NF4_VALUES) + tol(x)).all()
    with pytest.raises(ValueError, match="scale_dtype"):
        make_format("nf4", scale_dtype="float8")
