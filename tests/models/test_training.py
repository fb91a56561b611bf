import json

import pytest
import torch

from fourbit.models import load_weights, read_metadata
from fourbit.training.ema import EMA
from fourbit.training.train import TrainConfig, _lr_factor, main, train


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def _cfg(tmp_path, **kw):
    base = dict(
        model="fashion-unet",
        out=str(tmp_path),
        steps=2,
        batch_size=4,
        log_every=1,
        eval_samples=0,
        grid_steps=1,
        grid_per_class=1,
        device="cpu",
        warmup_steps=1,
        arch_overrides=dict(channels=(32, 32, 32), groups=8, emb_dim=32, freq_dim=16),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_weights_log_and_grid(tmp_path):
    record = train(_cfg(tmp_path), train_data=_data(), eval_data=_data(8, seed=1), log=lambda m: None)
    assert record["steps"] == 2
    meta = read_metadata(tmp_path / "fashion-unet.safetensors")
    assert meta["training"]["steps"] == 2 and meta["training"]["final"] is True
    assert {"wall_time_s", "final_loss", "seed", "torch_version", "date"} <= set(meta["training"])
    model, _ = load_weights(tmp_path / "fashion-unet.safetensors")
    assert model.config.channels == (32, 32, 32)
    log = json.loads((tmp_path / "fashion-unet.losses.json").read_text())
    assert [r["step"] for r in log["losses"]] == [1, 2]
    assert (tmp_path / "fashion-unet.samples.png").read_bytes()[:4] == b"\x89PNG"


def test_training_is_seeded(tmp_path):
    kw = dict(model="fashion-dit", arch_overrides=dict(width=32, depth=1, num_heads=2), grid_steps=1)
    train(_cfg(tmp_path / "a", **kw), train_data=_data(), log=lambda m: None)
    train(_cfg(tmp_path / "b", **kw), train_data=_data(), log=lambda m: None)
    a, _ = load_weights(tmp_path / "a" / "fashion-dit.safetensors")
    b, _ = load_weights(tmp_path / "b" / "fashion-dit.safetensors")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_cli_parses_arguments(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("fourbit.training.train.train", lambda cfg, log: seen.append(cfg))
    main(
        ["--model", "fashion-dit", "--minutes", "1.5", "--out", str(tmp_path), "--seed", "3", "--arch", '{"depth": 1}']
    )
    cfg = seen[-1]
    assert cfg.minutes == 1.5 and cfg.seed == 3 and cfg.arch_overrides == {"depth": 1} and cfg.steps is None
    main(["--", "--model", "fashion-unet", "--steps", "5", "--out", str(tmp_path)])  # as `fourbit train -- ARGS`
    assert seen[-1].model == "fashion-unet" and seen[-1].steps == 5


def test_budget_required_and_lr_schedule(tmp_path):
    with pytest.raises(ValueError, match="budget"):
        TrainConfig(model="fashion-dit", out=str(tmp_path))
    cfg = TrainConfig(model="fashion-dit", out=str(tmp_path), steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    assert _lr_factor(cfg, 0, 0) == pytest.approx(0.01)
    assert _lr_factor(cfg, 99, 0) == pytest.approx(1.0)  # end of warm-up
    after = [_lr_factor(cfg, s, 0) for s in range(100, 1001, 100)]
    assert after == sorted(after, reverse=True)  # cosine over the whole budget
    assert _lr_factor(cfg, 1000, 0) == pytest.approx(0.1)


def test_ema_warmup_and_tracking():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, max_decay=0.99)
    assert ema.decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(2000):
        ema.update(model)
    assert ema.decay() == 0.99
    torch.testing.assert_close(ema.model.weight, torch.ones(2, 2))
    assert not ema.model.weight.requires_grad
