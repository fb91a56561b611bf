"""Frechet distance: closed forms, both numerical routes, bootstrap intervals, AlexNet features."""

import math

import numpy as np
import pytest
import torch

from fourbit.eval import bootstrap_fd, fd_features, frechet_distance, frechet_distance_from_stats
from fourbit.eval.fd import _fd, bootstrap_fd_replicates


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_same_set_is_zero():
    g = _gen()
    few = torch.randn(30, 100, generator=g, dtype=torch.float64)  # N < D: sample-space route
    many = torch.randn(2000, 16, generator=g, dtype=torch.float64)  # N >> D: covariance route
    assert frechet_distance(few, few) < 1e-8
    assert frechet_distance(many, many) < 1e-8


def test_closed_form_diagonal():
    # N(mu1, diag(a)) vs N(mu2, diag(b)): |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance_from_stats(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, abs=1e-10)


def test_closed_form_general_vs_numpy_reference():
    # tr((S1^1/2 S2 S1^1/2)^1/2) from a numpy eigendecomposition written here
    g = _gen(1)
    d = 12
    s1, s2 = _spd(d, g), _spd(d, g)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)

    def sqrtm(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    h = sqrtm(s1.numpy())
    ref = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace()) - 2 * np.trace(sqrtm(h @ s2.numpy() @ h))
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-10)


def test_samples_of_two_gaussians_approach_closed_form():
    g = _gen(2)
    d, n = 4, 200_000
    s1, s2 = _spd(d, g), _spd(d, g)
    mu2 = torch.full((d,), 0.5, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T + mu2
    exact = frechet_distance_from_stats(torch.zeros(d), s1, mu2, s2)
    assert frechet_distance(x, y) == pytest.approx(exact, rel=0.02)


def test_routes_agree_and_weights_equal_repeated_rows():
    g = _gen(3)
    a = torch.randn(40, 64, generator=g, dtype=torch.float64) * 1.3 + 0.2
    b = torch.randn(90, 64, generator=g, dtype=torch.float64)
    via_stats = frechet_distance_from_stats(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert frechet_distance(a, b) == pytest.approx(via_stats, rel=1e-7)  # sample-space vs covariance route
    wa = torch.randint(1, 4, (40,), generator=g).double()
    wb = torch.randint(1, 4, (90,), generator=g).double()
    rep = _fd(a.repeat_interleave(wa.long(), 0), b.repeat_interleave(wb.long(), 0))
    # (the repeated rows take the covariance route, whose near-zero eigenvalues add ~sqrt(eps) each)
    assert _fd(a, b, wa, wb) == pytest.approx(rep, abs=1e-5)


def test_bootstrap_interval():
    g = _gen(4)
    a = torch.randn(300, 8, generator=g, dtype=torch.float64)
    b = torch.randn(300, 8, generator=g, dtype=torch.float64) + 0.3
    v, lo, hi = bootstrap_fd(a, b, n_boot=200, seed=0)
    assert v == frechet_distance(a, b)
    assert lo < v < hi
    assert bootstrap_fd(a, b, n_boot=200, seed=0) == (v, lo, hi)  # seeded
    v2, plo, phi = bootstrap_fd(a, b, n_boot=200, seed=0, interval="percentile")
    assert v2 == v and plo < phi and phi - plo == pytest.approx(hi - lo, rel=1e-9)  # same spread, shifted
    assert bootstrap_fd(a, b, n_boot=0) == (v, v, v)
    reps = bootstrap_fd_replicates(a, b, n_boot=50, seed=0)
    assert reps.shape == (50,) and reps.mean() > v  # resampling inflates FD (documented)


def test_errors():
    a = torch.randn(10, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="feature size mismatch"):
        frechet_distance(a, torch.randn(10, 6))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(a[:1], a)
    bad = a.clone()
    bad[3, 2] = math.inf
    with pytest.raises(ValueError, match="feats_b: contains NaN or Inf"):
        frechet_distance(a, bad)
    with pytest.raises(ValueError, match="interval"):
        bootstrap_fd(a, a, interval="bca")


def test_alexnet_features_of_small_images():
    g = _gen(5)
    x = torch.rand(6, 1, 28, 28, generator=g) * 2 - 1
    f = fd_features(x, batch_size=4)
    assert f.shape == (6, 64 + 192 + 384 + 256 + 256) and f.dtype == torch.float64
    assert (f >= 0).all()  # spatial means of ReLU outputs
    assert torch.allclose(f, fd_features(x.repeat(1, 3, 1, 1)))
    assert frechet_distance(f, f) < 1e-6
