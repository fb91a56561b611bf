import pytest
import torch

from fourbit.models import build_model
from fourbit.sampling import NoiseSchedule, calibration_forward_loop, guided_eps, sample, sample_plan

from ..models.test_models import TINY, randomize_
from .toy_models import ClassConstant, GaussianEps, exact_eps_for_point


@pytest.fixture(scope="module")
def dit():
    return randomize_(build_model("fashion-dit", **TINY["fashion-dit"]))


def test_output_shape_and_range(dit):
    x = sample(dit, [0, 1, 10], [5, 6, 7], steps=3)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


# Noise is seeded per sample, so batch size and composition change nothing but the float32 rounding of the
# matrix products (CPU BLAS blocks differently per batch size): ~1e-5 after a few steps.
BATCH_ATOL = 1e-4


def test_ddim_eta0_deterministic_and_batch_independent(dit):
    classes, seeds = sample_plan(5, seed=100)
    a = sample(dit, classes, seeds, steps=4, batch_size=5)
    b = sample(dit, classes, seeds, steps=4, batch_size=2)
    c = sample(dit, classes[3:], seeds[3:], steps=4, batch_size=1)
    torch.testing.assert_close(a, b, rtol=0, atol=BATCH_ATOL)
    torch.testing.assert_close(a[3:], c, rtol=0, atol=BATCH_ATOL)
    assert torch.equal(a, sample(dit, classes, seeds, steps=4, batch_size=5))


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.7)])
def test_stochastic_samplers_seeded_per_sample(dit, sampler, eta):
    x = sample(dit, [1, 2, 1], [11, 12, 11], steps=3, sampler=sampler, eta=eta, batch_size=3)
    y = sample(dit, [1], [11], steps=3, sampler=sampler, eta=eta)
    torch.testing.assert_close(x[0], x[2], rtol=0, atol=BATCH_ATOL)  # same (class, seed) twice in one batch
    torch.testing.assert_close(x[:1], y, rtol=0, atol=BATCH_ATOL)
    z = sample(dit, [1], [13], steps=3, sampler=sampler, eta=eta)
    assert not torch.allclose(z, y)


def test_guidance_is_batched_and_combined():
    model = ClassConstant()
    x = torch.zeros(2, 1, 4, 4)
    eps = guided_eps(model, x, 500, torch.tensor([3, 5]), guidance_scale=2.0)
    ((b, t, y),) = model.calls
    assert b == 4 and y.tolist() == [3, 5, 10, 10] and (t == 500).all()
    # uncond + 2 (cond - uncond) with cond = 0.01 y, uncond = 0.1
    torch.testing.assert_close(eps[:, 0, 0, 0], torch.tensor([0.1 + 2 * (0.03 - 0.1), 0.1 + 2 * (0.05 - 0.1)]))
    model.calls.clear()
    guided_eps(model, x, 500, torch.tensor([3, 5]), guidance_scale=1.0)
    assert model.calls[0][0] == 2  # conditional only


def test_delta_data_recovered_exactly():
    """With the exact eps of a single data point both samplers land on it, whatever the noise."""
    s = NoiseSchedule()
    model = exact_eps_for_point(0.25, s)
    for sampler in ("ddim", "ddpm"):
        x = sample(model, [0, 1], [0, 1], steps=10, sampler=sampler, guidance_scale=1.0, shape=(1, 3, 3), device="cpu")
        torch.testing.assert_close(x, torch.full_like(x, 0.25), rtol=0, atol=1e-4)


def test_ddpm_gaussian_data_marginal():
    """DDPM (1000 steps) with the exact eps of N(m, s^2) data: sample mean and std match m and s.

    4096 independent pixels: standard errors s/64 = 0.003 (mean) and s/90 = 0.002 (std); we allow 0.015
    (5 standard errors), which also covers the sampler's small-variance (beta tilde) discretisation.
    """
    m, s = 0.3, 0.2
    n = 16
    x = sample(
        GaussianEps(m, s),
        [0] * n,
        range(n),
        steps=1000,
        sampler="ddpm",
        guidance_scale=1.0,
        clip_x0=False,
        shape=(1, 16, 16),
        batch_size=n,
    )
    assert abs(x.mean().item() - m) < 0.015
    assert abs(x.std().item() - s) < 0.015


def test_ddim_gaussian_closed_form():
    """DDIM (eta=0) with the exact eps of N(m, s^2) data is linear: x_prev - sqrt(ab') m = r (x_t - sqrt(ab) m) with
    r = (sqrt(ab ab') s^2 + sqrt((1-ab)(1-ab'))) / v, v = ab s^2 + 1 - ab. Each r is below the exact
    sqrt(v'/v) (Cauchy-Schwarz), so few steps shrink the spread: a known DDIM property, checked here exactly.
    """
    m, s, steps = 0.3, 0.2, 10
    sched = NoiseSchedule()
    x = sample(GaussianEps(m, s), [0, 0], [3, 4], steps=steps, guidance_scale=1.0, clip_x0=False, shape=(1, 4, 4))
    x_T = torch.stack([torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(k)) for k in (3, 4)])
    ts = sched.timesteps(steps) + [-1]
    gain = 1.0
    for t, tp in zip(ts, ts[1:]):
        ab, abp = sched.alpha_bar(t), sched.alpha_bar(tp)
        gain *= ((ab * abp) ** 0.5 * s**2 + ((1 - ab) * (1 - abp)) ** 0.5) / (ab * s**2 + 1 - ab)
    expected = m + gain * (x_T - sched.alpha_bar(999) ** 0.5 * m)
    torch.testing.assert_close(x, expected, rtol=0, atol=2e-5)
    assert gain < s  # the spread shrinks (to about s/2 here, at 10 steps)


def test_calibration_loop_spreads_classes_and_timesteps():
    model = ClassConstant()
    loop = calibration_forward_loop(num_samples=12, steps=3, guidance_scale=2.0, seed=4, batch_size=8)
    loop(model)
    assert len(model.calls) == 2 * 3  # two batches of samples x three steps
    seen_t = {int(t[0]) for _, t, _ in model.calls}
    assert seen_t == set(NoiseSchedule().timesteps(3))
    ys = torch.cat([y for _, _, y in model.calls[::3]])  # first step of each batch
    assert sorted(ys[ys != 10].tolist()) == sorted([i % 10 for i in range(12)])
    assert (ys == 10).sum() == 12


def test_plan_convention():
    classes, seeds = sample_plan(12, seed=7)
    assert classes.tolist() == [i % 10 for i in range(12)] and seeds == list(range(7, 19))


def test_progress_bar(dit, capsys, monkeypatch):
    monkeypatch.setenv("FOURBIT_PROGRESS", "1")  # the test suite turns bars off
    sample(dit, [0], [0], steps=2, progress=True)
    assert "2/2" in capsys.readouterr().err


def test_argument_errors(dit):
    with pytest.raises(ValueError, match="sampler"):
        sample(dit, [0], [0], sampler="euler")
    with pytest.raises(ValueError, match="seeds"):
        sample(dit, [0, 1], [0])
