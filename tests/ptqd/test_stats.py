"""The statistics pass: k_t, mu_t, sigma_q,t and SNR_Q on synthetic predictions, and streaming on a tiny model."""
import math

import pytest
import torch

from fourbit.ptqd import NoiseMoments, collect_stats, correct_eps


def _synthetic(k, mu, noise_std, batches=6, b=16, shape=(2, 8, 8), seed=0, dtype=torch.float32):
    """eps_fp ~ N(0, 1) and eps_q = (1 + k) eps_fp + mu_c + noise, in batches."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor(mu, dtype=dtype).reshape(1, -1, 1, 1)
    for _ in range(batches):
        e = torch.randn(b, *shape, generator=g, dtype=dtype)
        yield e, (1 + k) * e + mu + noise_std * torch.randn(b, *shape, generator=g, dtype=dtype)


def _moments(batches):
    m = NoiseMoments()
    for e, q in batches:
        m.update(e, q)
    return m


def test_k_recovers_planted_slope():
    r = _moments(_synthetic(0.25, [0.1, -0.3], 0.2)).finalize()
    # 6 * 16 * 128 = 12288 elements: the slope's standard error is ~0.2 / sqrt(12288) ~ 0.002
    assert r["k"] == pytest.approx(0.25, abs=0.01)
    assert r["mu"] == pytest.approx([0.1, -0.3], abs=0.01)
    assert r["sigma_q"] == pytest.approx(0.2, rel=0.05)  # the noise left after the full correction
    assert r["samples"] == 96
    assert r["corr"] > 0.7


def test_k_is_clipped_at_zero_and_bias_modes():
    m = _moments(_synthetic(-0.2, [0.05, 0.0], 0.1))
    res, tot = m.finalize("residual"), m.finalize("total")
    assert res["k_raw"] == pytest.approx(-0.2, abs=0.01)
    assert res["k"] == 0.0
    # with k = 0 the residual is the total noise, so both bias modes agree
    assert res["mu"] == pytest.approx(tot["mu"], abs=1e-12)


def test_total_bias_is_the_mean_of_delta_and_sigma_q_the_mean_per_sample_std():
    batches = list(_synthetic(0.3, [0.2, -0.1], 0.15, batches=3))
    r = _moments(batches).finalize("total")
    e = torch.cat([b[0] for b in batches]).double()
    d = torch.cat([b[1] for b in batches]).double() - e
    assert r["mu"] == pytest.approx(d.mean((0, 2, 3)).tolist(), abs=1e-9)
    # the spec's sigma_q: mean over samples of std(Delta - k eps) (the authors' code: torch.std per sample)
    expect = (d - r["k"] * e).flatten(1).std(1).mean().item()
    assert r["sigma_q"] == pytest.approx(expect, rel=1e-9)
    assert r["snr_q"] == pytest.approx((e.norm() / d.norm()).item(), rel=1e-9)


def test_correction_exactly_inverts_planted_error():
    k, mu = 0.4, [0.25, -0.5]
    batches = list(_synthetic(k, mu, 0.0, batches=2, dtype=torch.float64))  # float64: exact up to rounding
    r = _moments(batches).finalize()
    assert r["k"] == pytest.approx(k, abs=1e-12) and r["mu"] == pytest.approx(mu, abs=1e-12)
    assert r["sigma_q"] == pytest.approx(0.0, abs=1e-6)  # sqrt of a rounding-level variance
    for e, q in batches:
        torch.testing.assert_close(correct_eps(q, r["k"], r["mu"]), e, rtol=0, atol=1e-12)
        torch.testing.assert_close(correct_eps(q, k, mu), e, rtol=0, atol=1e-12)


def test_streaming_moments_are_exactly_independent_of_batching():
    """The same predictions fed in one batch or split 4 + 1 + 1 give the very same statistics. The values are
    multiples of 1/8 so that every float64 sum is exact in any order: equality, not a tolerance."""
    g = torch.Generator().manual_seed(0)
    e = torch.randint(-16, 17, (6, 3, 5, 5), generator=g).float() / 8
    q = e + torch.randint(-4, 5, (6, 3, 5, 5), generator=g).float() / 8
    whole, split = NoiseMoments(), NoiseMoments()
    whole.update(e, q)
    for lo, hi in ((0, 4), (4, 5), (5, 6)):
        split.update(e[lo:hi], q[lo:hi])
    for bias in ("residual", "total"):
        assert whole.finalize(bias) == split.finalize(bias)


def test_collected_stats_agree_across_batch_sizes(tiny_pair):
    """End to end, batch sizes agree only as far as floating point lets them: BLAS blocks a GEMM differently
    for 6 and 4 rows (~1e-7 relative in fp32), the first DDIM step from t=999 multiplies that by ~50, and a
    4-bit activation code that sits on a rounding boundary then flips, moving eps_q by a whole quantization
    step. Measured here: up to 1.6e-3 relative (corr at step 1); 2e-2 leaves room for other CPUs, and a real
    streaming bug still fails it (a dropped batch, 4 of the 6 samples, moves int4 k by 18% and corr by 10-17%).
    The streaming itself is tested exactly above."""
    fp, q = tiny_pair
    kw = dict(steps=2, num_samples=6, guidance_scale=2.0, act_formats=["int4", "int8"], model_name="tiny")
    a = collect_stats(fp, q, batch_size=6, **kw)
    b = collect_stats(fp, q, batch_size=4, **kw)
    for lb in ("int4", "int8"):
        for key in ("k", "sigma_q", "snr_q", "corr"):
            assert getattr(a.formats[lb], key) == pytest.approx(getattr(b.formats[lb], key), rel=2e-2, abs=1e-6)
    assert a.timesteps == [999, 0] and a.base == "int4" and a.schedule is not None
    assert all(k >= 0 for k in a.formats["int4"].k)
    # 8-bit activations are much closer to the 16-bit model than 4-bit ones
    assert min(a.formats["int8"].snr_q) > max(a.formats["int4"].snr_q)
    assert all(math.isfinite(s) and s > 0 for s in a.formats["int4"].sigma_q)
