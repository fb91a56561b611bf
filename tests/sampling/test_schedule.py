import math

import pytest
import torch

from fourbit.sampling import NoiseSchedule, ddim_sigma, step_sigma


def test_linear_schedule_values():
    s = NoiseSchedule()
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alpha_bar(0) == pytest.approx(1 - 1e-4)
    assert s.alpha_bar(-1) == 1.0
    assert s.alpha_bar(999) == pytest.approx(4.04e-5, rel=0.01)
    with pytest.raises(ValueError):
        s.alpha_bar(1000)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 50, 1000])
def test_timesteps_even_and_distinct(n):
    ts = NoiseSchedule().timesteps(n)
    assert len(ts) == n == len(set(ts)) and ts[0] == 999
    assert ts == sorted(ts, reverse=True)
    if n > 1:
        assert ts[-1] == 0
        gaps = [a - b for a, b in zip(ts, ts[1:])]
        assert max(gaps) - min(gaps) <= 1


def test_add_noise_marginal():
    s = NoiseSchedule()
    x0 = torch.full((4, 1, 2, 2), 0.5)
    noise = torch.randn(4, 1, 2, 2)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.add_noise(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        ab = s.alpha_bar(ti)
        torch.testing.assert_close(xt[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i])


def test_ddpm_sigma_is_ddim_at_eta_one():
    ab_t, ab_prev = 0.3, 0.5
    beta = 1 - ab_t / ab_prev
    posterior_var = beta * (1 - ab_prev) / (1 - ab_t)
    assert step_sigma("ddpm", ab_t, ab_prev, 0.0) == pytest.approx(math.sqrt(posterior_var))
    assert ddim_sigma(ab_t, ab_prev, 1.0) == pytest.approx(math.sqrt(posterior_var))
    assert ddim_sigma(ab_t, ab_prev, 0.0) == 0.0
    assert ddim_sigma(ab_t, 1.0, 1.0) == 0.0  # last step: no noise
