
import pytest
import torch

from fourbit.models import build_model
from fourbit.sampling import NoiseSchedule, SamplerHook, StepInfo, ddim_sigma, sample

from ..models.test_models import TINY, randomize_
from .toy_models import ClassConstant, GaussianEps


class Recorder(SamplerHook):
    def __init__(self):
        self.events = []

    def before_step(self, step, model):
        self.events.append(("before", step))

    def on_eps(self, step, x_t, eps):
        self.events.append(("eps", step, eps.clone()))
        return eps

    def adjust_sigma(self, step, sigma):
        self.events.append(("sigma", step, sigma))
        return sigma


@pytest.fixture(scope="module")
def dit():
    return randomize_(build_model("fashion-dit", **TINY["fashion-dit"]))


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
def test_step_info_fields(sampler, eta):
    rec = Recorder()
    steps, s = 5, NoiseSchedule()
    sample(
        GaussianEps(0.0, 0.5),
        [1, 2],
        [0, 1],
        steps=steps,
        sampler=sampler,
        eta=eta,
        guidance_scale=2.5,
        hooks=[rec],
        batch_size=2,
    )
    infos = [e[1] for e in rec.events if e[0] == "before"]
    ts = s.timesteps(steps)
    assert [i.index for i in infos] == list(range(steps))
    assert [i.t for i in infos] == ts and [i.t_prev for i in infos] == ts[1:] + [-1]
    for info in infos:
        assert isinstance(info, StepInfo) and info.num_steps == steps and info.sampler == sampler
        assert info.guidance_scale == 2.5
        assert info.alpha_bar_t == pytest.approx(s.alpha_bar(info.t))
        assert info.alpha_bar_prev == pytest.approx(s.alpha_bar(info.t_prev))
        assert info.beta_t == pytest.approx(1 - info.alpha_bar_t / info.alpha_bar_prev)
        expected_eta = 1.0 if sampler == "ddpm" else eta
        assert info.eta == expected_eta
        assert info.sigma == pytest.approx(ddim_sigma(info.alpha_bar_t, info.alpha_bar_prev, expected_eta))
    assert infos[-1].is_last and infos[-1].alpha_bar_prev == 1.0 and infos[-1].sigma == 0.0
    # Order within each step: before_step, on_eps, adjust_sigma.
    assert [e[0] for e in rec.events] == ["before", "eps", "sigma"] * steps


def test_before_step_runs_before_the_model():
    order = []
    model = ClassConstant()
    real_forward = model.forward
    model.forward = lambda x, t, y: (order.append("model"), real_forward(x, t, y))[1]

    class H:
        def before_step(self, step, m):
            order.append(f"hook{step.index}")

    sample(model, [0], [0], steps=2, hooks=[H()], shape=(1, 2, 2))
    assert order == ["hook0", "model", "hook1", "model"]


def test_on_eps_sees_guided_eps_and_changes_result():
    model = ClassConstant()  # cond 0.01 * y, uncond 0.1
    rec = Recorder()
    sample(model, [4], [0], steps=2, guidance_scale=3.0, hooks=[rec], shape=(1, 2, 2))
    eps = [e[2] for e in rec.events if e[0] == "eps"][0]
    torch.testing.assert_close(eps, torch.full((1, 1, 2, 2), 0.1 + 3.0 * (0.04 - 0.1)))


def test_on_eps_modification_takes_effect(dit):
    base = sample(dit, [3], [9], steps=3)

    class Scale:
        def on_eps(self, step, x_t, eps):
            return eps * 0.5

    class Identity:
        def on_eps(self, step, x_t, eps):
            return eps

    assert not torch.allclose(sample(dit, [3], [9], steps=3, hooks=[Scale()]), base)
    assert torch.equal(sample(dit, [3], [9], steps=3, hooks=[Identity()]), base)


def test_on_eps_can_replace_the_model():
    """Hooks compose in order; replacing eps by the exact Gaussian eps reproduces the Gaussian model's samples."""
    target = GaussianEps(0.1, 0.3)

    class Replace:
        def on_eps(self, step, x_t, eps):
            return target(x_t, torch.full((x_t.shape[0],), step.t), None)

    ref = sample(target, [0, 1], [0, 1], steps=4, sampler="ddpm", guidance_scale=1.0, shape=(1, 4, 4))
    got = sample(
        ClassConstant(), [0, 1], [0, 1], steps=4, sampler="ddpm", guidance_scale=1.0, hooks=[Replace()], shape=(1, 4, 4)
    )
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.6), ("ddpm", 0.0)])
def test_adjust_sigma_identity_leaves_results_unchanged(dit, sampler, eta):
    class Same:
        def adjust_sigma(self, step, sigma):
            return sigma

    base = sample(dit, [1, 5], [3, 4], steps=3, sampler=sampler, eta=eta)
    assert torch.equal(sample(dit, [1, 5], [3, 4], steps=3, sampler=sampler, eta=eta, hooks=[Same()]), base)


def test_adjust_sigma_changes_noise_and_ddim_direction():
    """DDIM: sigma' replaces sigma in the direction term too; so eta=0 with sigma' = DDIM(eta=1) sigma equals eta=1."""

    class AsEtaOne:
        def adjust_sigma(self, step, sigma):
            return ddim_sigma(step.alpha_bar_t, step.alpha_bar_prev, 1.0)

    model = GaussianEps(0.0, 0.5)
    kw = dict(steps=4, guidance_scale=1.0, shape=(1, 4, 4))
    eta1 = sample(model, [0], [5], sampler="ddim", eta=1.0, **kw)
    # With eta=0 noise is drawn only where the hook asks for it, in the same per-sample order.
    hooked = sample(model, [0], [5], sampler="ddim", eta=0.0, hooks=[AsEtaOne()], **kw)
    torch.testing.assert_close(hooked, eta1)

    class Zero:
        def adjust_sigma(self, step, sigma):
            return 0.0

    ddpm = sample(model, [0], [5], sampler="ddpm", **kw)
    assert not torch.allclose(sample(model, [0], [5], sampler="ddpm", hooks=[Zero()], **kw), ddpm)


def test_negative_sigma_refused(dit):
    class Bad:
        def adjust_sigma(self, step, sigma):
            return -1.0

    with pytest.raises(ValueError, match="negative"):
        sample(dit, [0], [0], steps=2, hooks=[Bad()])
