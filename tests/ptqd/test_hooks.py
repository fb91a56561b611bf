"""The inference side: the correction hook, variance-schedule calibration (VSC), and setting checks."""
import copy
import math

import pytest
import torch

from fourbit.ptqd import PTQDHook, PTQDStatsMismatch, collect_stats, ptqd_hooks, vsc_sigma
from fourbit.sampling import NoiseSchedule, StepInfo, sample, sample_plan, step_sigma


def _step(sampler="ddim", eta=1.0, t=500, t_prev=480, schedule=NoiseSchedule()):
    ab, abp = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    return StepInfo(index=0, num_steps=1, t=t, t_prev=t_prev, alpha_bar_t=ab, alpha_bar_prev=abp,
                    beta_t=1 - ab / abp, sigma=step_sigma(sampler, ab, abp, eta), eta=1.0 if sampler == "ddpm" else eta,
                    sampler=sampler, guidance_scale=3.0)


def _zero_noise(stats):
    """The same statistics with k = 0, mu = 0 and sigma_q = 0 at every step."""
    s = copy.deepcopy(stats)
    for fs in s.formats.values():
        fs.k = [0.0] * len(fs.k)
        fs.mu = [[0.0] * len(m) for m in fs.mu]
        fs.sigma_q = [0.0] * len(fs.sigma_q)
    return s


def test_vsc_formulas():
    k, sq = 0.1, 0.05
    st = _step("ddpm")
    beta, ab = st.beta_t, st.alpha_bar_t
    expect = math.sqrt(st.sigma**2 - beta**2 * sq**2 / ((1 - beta) * (1 - ab) * (1 + k) ** 2))
    assert vsc_sigma(st, st.sigma, k, sq) == pytest.approx(expect, rel=1e-12)
    st = _step("ddim", eta=0.5)
    lam = abs(math.sqrt(1 - st.alpha_bar_prev - st.sigma**2)
              - math.sqrt(st.alpha_bar_prev * (1 - ab) / ab)) / (1 + k)
    assert vsc_sigma(st, st.sigma, k, sq) == pytest.approx(math.sqrt(st.sigma**2 - lam**2 * sq**2), rel=1e-12)
    assert 0 < vsc_sigma(st, st.sigma, k, sq) < st.sigma
    assert vsc_sigma(st, st.sigma, k, 10.0) == 0.0  # floored at 0
    # nothing to absorb, or no noise injected: sigma comes back as the very same float
    assert vsc_sigma(st, st.sigma, k, 0.0) == st.sigma
    assert vsc_sigma(_step("ddim", eta=0.0), 0.0, k, sq) == 0.0


def test_correction_hook_inverts_per_step(tiny_pair):
    fp, q = tiny_pair
    stats = collect_stats(fp, q, steps=2, num_samples=2, guidance_scale=1.0, model_name="tiny")
    fs = stats.formats[stats.base]
    fs.k, fs.mu = [0.5, 0.25], [[0.1], [-0.2]]
    hook = PTQDHook(stats, q_model=q)
    eps = torch.randn(3, 1, 28, 28)
    for i, (k, mu) in enumerate([(0.5, 0.1), (0.25, -0.2)]):
        st = StepInfo(i, 2, stats.timesteps[i], -1, 0.5, 0.6, 0.1, 0.0, 0.0, "ddim", 1.0)
        torch.testing.assert_close(hook.on_eps(st, eps, eps), (eps - mu) / (1 + k))
    off = PTQDHook(stats, correlated=False, bias=False)
    assert off.on_eps(st, eps, eps) is eps


@pytest.mark.parametrize("sampler, eta", [("ddim", 1.0), ("ddpm", 1.0), ("ddim", 0.0)])
def test_vsc_with_zero_noise_is_the_unmodified_sampler(tiny_pair, sampler, eta):
    fp, q = tiny_pair
    stats = _zero_noise(collect_stats(fp, q, steps=3, sampler=sampler, eta=eta, num_samples=2, model_name="tiny"))
    classes, seeds = sample_plan(3, 0)
    plain = sample(q, classes, seeds, steps=3, sampler=sampler, eta=eta)
    hooked = sample(q, classes, seeds, steps=3, sampler=sampler, eta=eta, hooks=ptqd_hooks(stats, q_model=q))
    assert torch.equal(plain, hooked)  # bit-identical


def test_vsc_is_a_no_op_at_eta_zero(tiny_pair):
    fp, q = tiny_pair
    stats = collect_stats(fp, q, steps=3, eta=0.0, num_samples=2, model_name="tiny")
    assert min(stats.formats[stats.base].sigma_q) > 0
    classes, seeds = sample_plan(2, 0)
    without = sample(q, classes, seeds, steps=3, hooks=[PTQDHook(stats, variance=False)])
    with_vsc = sample(q, classes, seeds, steps=3, hooks=[PTQDHook(stats, variance=True)])
    assert torch.equal(without, with_vsc)


def test_statistics_of_one_setting_are_refused_for_another(tiny_pair):
    fp, q = tiny_pair
    stats = collect_stats(fp, q, steps=3, eta=0.0, guidance_scale=3.0, num_samples=2, model_name="tiny")
    classes, seeds = sample_plan(2, 0)
    for kw, field in [(dict(steps=2), "steps"), (dict(steps=3, guidance_scale=2.0), "guidance_scale"),
                      (dict(steps=3, eta=1.0), "eta"), (dict(steps=3, sampler="ddpm"), "sampler")]:
        kw = {"guidance_scale": 3.0, **kw}
        with pytest.raises(PTQDStatsMismatch, match=field):
            sample(q, classes, seeds, hooks=ptqd_hooks(stats), **kw)
    other = copy.deepcopy(fp)  # a 16-bit model has no fourbit header: another "quantized model"
    with pytest.raises(PTQDStatsMismatch, match="measured for quantized model"):
        PTQDHook(stats, q_model=other)


def test_hooks_without_q_model_check_the_sampled_model(tiny_pair):
    """issue 20 item 9: ``ptqd_hooks(stats)`` without q_model= used to apply another model's statistics."""
    import fourbit
    from fourbit.models import get_spec

    fp, q = tiny_pair
    stats = collect_stats(fp, q, steps=2, num_samples=2, guidance_scale=1.0, model_name="tiny")
    other = copy.deepcopy(fp)
    fourbit.quantize(other, fourbit.RTNConfig(group_size=32, exclude=get_spec("fashion-dit").quant_exclude),
                     progress=False, verbose=False)
    classes, seeds = sample_plan(2, 0, 10)
    with pytest.raises(PTQDStatsMismatch, match="measured for quantized model .* not for this one"):
        sample(other, classes, seeds, steps=2, guidance_scale=1.0, hooks=ptqd_hooks(stats))
    with pytest.raises(PTQDStatsMismatch, match="not for this one"):
        sample(fp, classes, seeds, steps=2, guidance_scale=1.0, hooks=ptqd_hooks(stats))
    sample(q, classes, seeds, steps=2, guidance_scale=1.0, hooks=ptqd_hooks(stats))  # its own model: fine
