"""PTQD's correction through the user's own loop (``fourbit.ptqd.experimental``) on a denoiser whose quantization
noise is known by construction: out_q = (1 + k_t) out_fp + mu_t + independent noise."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fourbit.ptqd import experimental as ptqd

K = {999: 0.20, 666: 0.10, 333: -0.05, 0: 0.0}  # the correlated part per timestep (k < 0 is clipped to 0, as PTQD does)
MU = torch.tensor([0.3, -0.2, 0.1])  # per-channel bias


class Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, timestep):
        t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        return torch.tanh(self.conv(x)) * (1 + t / 1000)


class NoisyDenoiser(nn.Module):
    """The 'quantized' model: the 16-bit one with a known correlated part, bias and residual."""

    def __init__(self, fp, channels_last=False):
        super().__init__()
        self.fp, self.channels_last = fp, channels_last
        self.gen = torch.Generator().manual_seed(1)

    def forward(self, x, timestep):
        out = self.fp(x, timestep)
        k = K[int(torch.as_tensor(timestep).reshape(-1)[0])]
        noisy = (1 + k) * out + MU.reshape(1, 3, 1, 1) + 0.05 * torch.randn(out.shape, generator=self.gen)
        return (noisy.flatten(2).transpose(1, 2),) if self.channels_last else (noisy,)  # (B, HW, C) as FLUX packs


def _loop(batches=4):
    def run(model):
        g = torch.Generator().manual_seed(2)
        for _ in range(batches):
            x = torch.randn(8, 3, 8, 8, generator=g)
            for t in K:
                model(x, timestep=torch.full((8,), float(t)))
    return run


def test_statistics_recover_the_constructed_noise():
    fp = Denoiser()
    stats = ptqd.collect_output_stats(fp, NoisyDenoiser(fp), _loop())
    assert sorted(stats.k) == sorted(float(t) for t in K)
    for t, k in K.items():
        assert stats.k[float(t)] == pytest.approx(max(k, 0.0), abs=0.02)  # 4 batches x 8 x 192 elements
        assert stats.calls[float(t)] == 4
    assert torch.tensor(stats.mu[999.0]) == pytest.approx(MU, abs=0.02)
    assert "timestep" in stats.summary()


def test_correction_brings_outputs_closer_to_the_16_bit_model():
    fp = Denoiser()
    q = NoisyDenoiser(fp)
    stats = ptqd.collect_output_stats(fp, q, _loop())
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    t = torch.full((4,), 999.0)
    ref = fp(x, t)
    before = (q(x, timestep=t)[0] - ref).pow(2).mean()
    handle = ptqd.apply_correction(q, stats)
    after = (q(x, timestep=t)[0] - ref).pow(2).mean()
    handle.remove()
    assert after < 0.1 * before  # bias (0.3^2 scale) and the 20% gain removed; 0.05 std residual is left
    again = (q(x, timestep=t)[0] - ref).pow(2).mean()
    assert again > 0.5 * before  # removed: outputs are uncorrected again


def test_packed_outputs_with_channels_last():
    fp = Denoiser()
    q = NoisyDenoiser(Denoiser(), channels_last=True)
    stats = ptqd.collect_output_stats(fp, q, _packed_loop(fp), channel_dim=-1)
    assert torch.tensor(stats.mu[999.0]) == pytest.approx(MU, abs=0.02)


def _packed_loop(fp):
    """fp's outputs packed as the noisy model packs them, so both compare in the same (B, HW, C) layout."""
    original = fp.forward

    def packed(x, timestep):
        return original(x, timestep).flatten(2).transpose(1, 2)

    fp.forward = packed
    return _loop()


def test_unseen_timestep_and_mixed_timesteps_are_refused():
    fp = Denoiser()
    q = Denoiser()  # same weights (seeded): stands in for a quantized copy
    stats = ptqd.collect_output_stats(fp, q, _loop(1))
    handle = ptqd.apply_correction(q, stats)
    with pytest.raises(ValueError, match="no timestep 500"):
        q(torch.randn(1, 3, 8, 8), timestep=torch.tensor([500.0]))
    handle.remove()
    with pytest.raises(ValueError, match="mixes timesteps"):
        ptqd.collect_output_stats(fp, q, lambda m: m(torch.randn(2, 3, 8, 8), timestep=torch.tensor([1.0, 2.0])))
    with pytest.raises(ValueError, match="never called"):
        ptqd.collect_output_stats(fp, q, lambda m: None)
    with pytest.raises(ValueError, match="same module"):
        ptqd.collect_output_stats(fp, fp, _loop(1))


def test_through_a_diffusers_scheduler_loop():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000)
    fp = Denoiser()

    class Q(nn.Module):  # quantization-like noise at every timestep the scheduler visits
        def __init__(self):
            super().__init__()
            self.fp = fp

        def forward(self, x, timestep):
            return 1.1 * self.fp(x, timestep) + 0.05

    q = Q()

    def sample(model):
        sched.set_timesteps(5)
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
        for t in sched.timesteps:
            out = model(x, timestep=t)
            x = sched.step(out, t, x).prev_sample
        return x

    stats = ptqd.collect_output_stats(fp, q, sample)
    assert len(stats.k) == 5 and all(k == pytest.approx(0.1, abs=1e-3) for k in stats.k.values())
    handle = ptqd.apply_correction(q, stats)
    corrected = sample(q)
    handle.remove()
    assert (corrected - sample(fp)).abs().max() < 0.1 * (sample(q) - sample(fp)).abs().max()
