"""Algebraic properties of the methods: Proposition 4.1, Eckart-Young, refinement keeps the best."""
import pytest
import torch

import fourbit
from fourbit.calibration import LayerStats
from fourbit.formats import make_format
from fourbit.methods import get_transform
from fourbit.methods.common import low_rank, low_rank_randomized, output_error, smoothing_factors

from ..helpers import outlier_layer


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_proposition_4_1(seed, fmt):
    """||XW - Q(X)Q(W)|| <= ||X|| ||W - Q(W)|| + ||X - Q(X)|| (||W|| + ||W - Q(W)||)  (Frobenius)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 128, generator=g) * (1 + 10 * (torch.rand(128, generator=g) > 0.95))
    w = torch.randn(64, 128, generator=g)  # (N, K): y = x @ w.T
    f = make_format(fmt)
    qx, qw = f.fake_quantize(x), f.fake_quantize(w)
    lhs = (x @ w.t() - qx @ qw.t()).norm()
    ew, ex = (w - qw).norm(), (x - qx).norm()
    rhs = x.norm() * ew + ex * (w.norm() + ew)
    assert lhs <= rhs * (1 + 1e-6)
    assert lhs > 0  # the bound is not vacuous: quantization did change the product


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (64, 64)])
def test_low_rank_is_eckart_young_optimal(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    down, up = low_rank(w, 8)
    assert down.shape == (8, shape[1]) and up.shape == (shape[0], 8)
    s = torch.linalg.svdvals(w)
    residual = (w - up.double() @ down.double()).norm()
    assert residual == pytest.approx(s[8:].pow(2).sum().sqrt().item(), rel=1e-5)


def test_randomized_split_is_near_optimal_on_a_decaying_spectrum_and_seeded():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    s = 0.9 ** torch.arange(200, dtype=torch.float64)  # a decaying spectrum, as trained weights have
    w = (u[:, :200] * s) @ v.t()  # (300, 200)
    down, up = low_rank_randomized(w, 8)
    assert down.shape == (8, 200) and up.shape == (300, 8)
    optimal = s[8:].pow(2).sum().sqrt().item()
    assert (w - up.double() @ down.double()).norm().item() == pytest.approx(optimal, rel=1e-3)
    again = low_rank_randomized(w, 8)
    assert torch.equal(down, again[0]) and torch.equal(up, again[1])
    exact = low_rank(w.float()[:20], 8)  # rank + oversample >= min(N, K): the exact split
    assert all(torch.equal(a, b) for a, b in zip(low_rank_randomized(w.float()[:20], 8), exact))


def test_randomized_alpha_search_picks_the_exact_searchs_alpha_and_splits_exactly():
    x, w = outlier_layer()
    stats = LayerStats(x.abs().amax(0), x[:512], x.shape[0], 1)
    states = {}
    for split in ("randomized", "exact"):
        cfg = fourbit.SVDQuantConfig(weights="int4", activations="int4", rank=16, search_split=split,
                                     alpha_grid=(0.2, 0.4, 0.6, 0.8))
        states[split] = get_transform(cfg)(w, stats, cfg)
    fast, exact = states["randomized"], states["exact"]
    assert fast.info["alpha"] == exact.info["alpha"]
    assert torch.equal(fast.lr_down, exact.lr_down) and torch.equal(fast.lr_up, exact.lr_up)
    assert fast.info["calib_rel_error"] == exact.info["calib_rel_error"]
    with pytest.raises(ValueError, match="search_split"):
        fourbit.SVDQuantConfig(search_split="approximate")


def test_smoothing_is_exact_in_float():
    x, w = torch.randn(16, 32), torch.randn(8, 32)
    lam = smoothing_factors(x.abs().amax(0), w, 0.5)
    assert torch.allclose((x / lam) @ (w * lam).t(), x @ w.t(), rtol=1e-4, atol=1e-4)


def test_refinement_never_worse():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(256, 128, generator=g), torch.randn(96, 128, generator=g)
    x[:, :3] *= 30
    stats = LayerStats(x.abs().amax(0), x, 256, 1)
    y = x @ w.t()
    base = fourbit.SVDQuantConfig(rank=8, alpha=0.5)
    e0 = output_error(get_transform(base)(w, stats, base), x, y)
    refined = fourbit.SVDQuantConfig(rank=8, alpha=0.5, refine_iters=3)
    e1 = output_error(get_transform(refined)(w, stats, refined), x, y)
    assert e1 <= e0 + 1e-7


def test_alpha_search_reports_choice():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(128, 64, generator=g), torch.randn(32, 64, generator=g)
    stats = LayerStats(x.abs().amax(0), x, 128, 1)
    cfg = fourbit.SmoothQuantConfig(alpha_grid=(0.25, 0.75))
    state = get_transform(cfg)(w, stats, cfg)
    assert state.info["alpha"] in (0.25, 0.75)
    assert 0 <= state.info["calib_rel_error"] < 1


def test_weight_only_nf4_leaves_activations_16bit():
    cfg = fourbit.NF4Config()
    state = get_transform(cfg)(torch.randn(16, 64), None, cfg)
    assert state.act_format is None and state.weight_format.name == "nf4"
