"""Train a bundled model on Fashion-MNIST with the epsilon-prediction DDPM loss.

    python -m fourbit.training.train --model fashion-dit --minutes 8 --out DIR [--data PATH] [--seed 0]

Writes into DIR: ``<model>.safetensors`` (EMA weights, fp16, metadata with architecture config and training
record), ``<model>.losses.json`` (loss curve and run record) and ``<model>.samples.png`` (10 classes x 10 seeds,
DDIM). On CUDA the forward/backward runs under bf16 autocast. With ``--steps`` and no time limit a CPU run is
reproducible bit for bit; with ``--minutes`` the step count (and, through the cosine schedule, the learning
rate) depends on speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fourbit.data.fashion_mnist import load_fashion_mnist
from fourbit.data.png import save_png
from fourbit.models.io import save_weights
from fourbit.models.registry import build_model, get_spec
from fourbit.sampling.calibration import sample_plan
from fourbit.sampling.sample import sample
from fourbit.sampling.schedule import NoiseSchedule
from fourbit.training.ema import EMA


@dataclass
class TrainConfig:
    """One training run. Stops at ``steps`` or after ``minutes`` of training, whichever comes first."""

    model: str
    out: str
    data: str | None = None
    seed: int = 0
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_max_decay: float = 0.9995
    class_dropout: float = 0.1
    hflip: bool = False
    log_every: int = 100
    checkpoint_every_s: float = 120.0
    device: str | None = None
    eval_samples: int = 10000
    grid_steps: int = 50
    grid_per_class: int = 10
    grid_guidance: float | None = None
    arch_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("give a budget: steps, minutes or both")


def _lr_factor(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warm-up, then cosine from 1 to ``min_lr_ratio`` over the budget (steps or time, whichever is further)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = 0.0
    if cfg.steps is not None:
        frac = max(frac, step / cfg.steps)
    if cfg.minutes is not None:
        frac = max(frac, elapsed_s / (60 * cfg.minutes))
    frac = min(frac, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 1, 28, 28)`` in [-1, 1]."""
    return (images.float() / 127.5 - 1.0)[:, None]


@torch.no_grad()
def evaluate_loss(
    model, images: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule, seed: int, batch_size: int = 1000
) -> float:
    """Mean eps-MSE over ``images`` (uint8) with fixed seeded timesteps and noise, conditional labels."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        x0 = _to_unit(images[i : i + batch_size])
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = schedule.add_noise(x0, noise, t)
        pred = model(xt.to(device), t.to(device), labels[i : i + batch_size].to(device)).float().cpu()
        total += F.mse_loss(pred, noise, reduction="sum").item()
        count += noise.numel()
    return total / count


def train(
    cfg: TrainConfig,
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    log=print,
) -> dict[str, Any]:
    """Run one training. ``train_data``/``eval_data`` (uint8 images, labels) default to Fashion-MNIST train/test.

    Returns the run record (also stored in the weights metadata and the loss log).
    """
    spec = get_spec(cfg.model)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if train_data is None:
        train_data = load_fashion_mnist("train", cfg.data)
        if eval_data is None:
            eval_data = load_fashion_mnist("test", cfg.data)
    images = _to_unit(train_data[0]).to(device)  # (N, 1, 28, 28) in [-1, 1]
    labels = train_data[1].to(device)
    n = images.shape[0]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    model = build_model(cfg.model, device=device, **cfg.arch_overrides).train()
    n_params = sum(p.numel() for p in model.parameters())
    ema = EMA(model, cfg.ema_max_decay)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    schedule = NoiseSchedule()
    gen = torch.Generator(device).manual_seed(cfg.seed)
    null = spec.null_class
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    log(
        f"[{cfg.model}] {n_params / 1e6:.2f}M params, {n} images, device {device}, batch {cfg.batch_size}, "
        f"budget steps={cfg.steps} minutes={cfg.minutes}"
    )

    record: dict[str, Any] = {
        "model": cfg.model,
        "config": asdict(cfg),
        "params": n_params,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": cfg.seed,
    }
    losses: list[dict[str, float]] = []
    weights_file = out / f"{cfg.model}.safetensors"

    def save(final: bool) -> None:
        save_weights(
            ema.model,
            weights_file,
            cfg.model,
            training={k: v for k, v in record.items() if k != "config"} | {"final": final},
        )

    start = time.perf_counter()
    last_ckpt = start
    budget_s = None if cfg.minutes is None else 60.0 * cfg.minutes
    window = torch.zeros((), device=device)
    window_n = 0
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        if (cfg.steps is not None and step >= cfg.steps) or (budget_s is not None and elapsed >= budget_s):
            break
        lr = cfg.lr * _lr_factor(cfg, step, elapsed)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen, device=device)
        x0 = images[idx]  # (B, 1, 28, 28)
        if cfg.hflip:
            flip = torch.rand(cfg.batch_size, generator=gen, device=device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        y = labels[idx]
        drop = torch.rand(cfg.batch_size, generator=gen, device=device) < cfg.class_dropout
        y = torch.where(drop, torch.full_like(y, null), y)
        t = torch.randint(0, schedule.num_train_timesteps, (cfg.batch_size,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        xt = schedule.add_noise(x0, noise, t)
        with autocast:
            pred = model(xt, t, y)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model)
        window += loss.detach()
        window_n += 1
        step += 1
        if step % cfg.log_every == 0:
            mean = (window / window_n).item()  # host sync once per log window
            now = time.perf_counter() - start
            losses.append({"step": step, "loss": mean, "time_s": round(now, 2), "lr": lr})
            log(f"[{cfg.model}] step {step} loss {mean:.4f} lr {lr:.2e} {step / now:.1f} steps/s {now:.0f}s")
            window.zero_()
            window_n = 0
            if time.perf_counter() - last_ckpt > cfg.checkpoint_every_s:
                record.update(steps=step, wall_time_s=round(now, 1), final_loss=mean)
                save(final=False)
                last_ckpt = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    if window_n:
        losses.append({"step": step, "loss": (window / window_n).item(), "time_s": round(wall, 2), "lr": lr})
    record.update(steps=step, wall_time_s=round(wall, 1), final_loss=losses[-1]["loss"] if losses else float("nan"))
    if eval_data is not None and cfg.eval_samples > 0:
        k = cfg.eval_samples
        record["eval_loss_ema"] = evaluate_loss(ema.model, eval_data[0][:k], eval_data[1][:k], schedule, seed=cfg.seed)
        record["eval_samples"] = min(k, eval_data[0].shape[0])
    log(
        f"[{cfg.model}] done: {step} steps in {wall:.0f}s, final train loss {record['final_loss']:.4f}, "
        f"EMA eval loss {record.get('eval_loss_ema', float('nan')):.4f}"
    )
    save(final=True)

    guidance = cfg.grid_guidance if cfg.grid_guidance is not None else spec.default_guidance_scale
    k, nc = cfg.grid_per_class, spec.num_classes
    classes, seeds = sample_plan(k * nc, seed=0, num_classes=nc)
    order = torch.arange(k * nc).reshape(k, nc).t().reshape(-1)  # regroup so that each grid row holds one class
    grid = sample(
        ema.model,
        classes[order],
        [seeds[i] for i in order],
        steps=cfg.grid_steps,
        guidance_scale=guidance,
        device=device,
    )
    save_png(out / f"{cfg.model}.samples.png", grid, nrow=k)
    record["grid"] = {
        "sampler": "ddim",
        "steps": cfg.grid_steps,
        "guidance_scale": guidance,
        "rows": f"classes 0..{nc - 1}",
        "seeds": f"0..{k * nc - 1} (seed i has class i % {nc})",
    }
    with open(out / f"{cfg.model}.losses.json", "w") as f:
        json.dump({"record": record, "losses": losses}, f, indent=1)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fourbit.training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="registry name, e.g. fashion-dit or fashion-unet")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST *-ubyte.gz files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="step budget")
    p.add_argument(
        "--minutes", type=float, default=None, help="training-time budget (excludes start-up and final sampling)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--ema-max-decay", type=float, default=0.9995)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--hflip", action="store_true", help="random horizontal flips")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--device", default=None)
    p.add_argument("--eval-samples", type=int, default=10000, help="test images for the final EMA loss (0: skip)")
    p.add_argument("--grid-steps", type=int, default=50)
    p.add_argument("--grid-per-class", type=int, default=10)
    p.add_argument("--arch", default="{}", help="JSON of architecture overrides, e.g. '{\"depth\": 1}' (for tests)")
    if argv and argv[0] == "--":  # `fourbit train -- --model ...` passes the separator through
        argv = argv[1:]
    a = p.parse_args(argv)
    cfg = TrainConfig(
        model=a.model,
        out=a.out,
        data=a.data,
        seed=a.seed,
        steps=a.steps,
        minutes=a.minutes,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        ema_max_decay=a.ema_max_decay,
        class_dropout=a.class_dropout,
        hflip=a.hflip,
        log_every=a.log_every,
        device=a.device,
        eval_samples=a.eval_samples,
        grid_steps=a.grid_steps,
        grid_per_class=a.grid_per_class,
        arch_overrides=json.loads(a.arch),
    )
    train(cfg, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
