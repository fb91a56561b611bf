"""QuaRTZ on the bundled models' own activations: LZS flag histogram and quantizer SQNR, per model.

Why truncation loses or wins is decided by the activations: the paper's error argument (algorithms.md section
3.5) says QuaRTZ beats plain int4 when fewer than about half of the LZS groups hold a large value (FLAG 4).
This script records the inputs every quantized layer sees while the 16-bit model samples (after SVDQuant's
smoothing for ``--smoothed``), and reports, per format, the FLAG histogram and the SQNR of the activation
quantizer alone, 10 log10(|x|^2 / |x - Q(x)|^2) summed over all layers and steps.

    python benchmarks/probes/quartz_activations.py --models fashion-dit,fashion-unet --samples 16 --steps 20 \
        --out benchmarks/results/quartz-activations.cpu.2026-11-22.md
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from collections import defaultdict

import torch

import fourbit
from fourbit.formats import make_format
from fourbit.models import get_spec, load_pretrained
from fourbit.nn import quantized_layers
from fourbit.nn.linear import conv_rows
from fourbit.kernels.reference import prepare_activation
from fourbit.sampling import calibration_forward_loop, sample, sample_plan

FORMATS = {  # label -> registry name
    "int4 g64 (RTN)": "int4",
    "quartz (trunc, G_s 16)": "quartz",
    "quartz_s32 (trunc, G_s 32)": "quartz_s32",
    "quartz_round (G_s 16)": "quartz_round",
    "quartz_s32_round (G_s 32)": "quartz_s32_round",
    "quartz_tok (trunc, per-token stage 1)": "quartz_tok",
}


class Recorder:
    """Accumulates, per format, |x|^2, |x - Q(x)|^2 and the FLAG histogram over every call."""

    def __init__(self, formats: dict):
        self.formats = formats
        self.signal = defaultdict(float)
        self.noise = defaultdict(float)
        self.flags = defaultdict(lambda: torch.zeros(5, dtype=torch.float64))

    def __call__(self, xs: torch.Tensor) -> None:
        xs = xs.float()
        for label, fmt in self.formats.items():
            q = fmt.quantize(xs)
            err = xs - fmt.dequantize(q)
            self.signal[label] += float((xs * xs).sum())
            self.noise[label] += float((err * err).sum())
            if hasattr(fmt, "flags"):
                self.flags[label] += torch.bincount(fmt.flags(q).flatten().long(), minlength=5)[:5].double()

    def rows(self):
        for label in self.formats:
            sq = 10 * math.log10(self.signal[label] / max(self.noise[label], 1e-30))
            h = self.flags.get(label)
            hist = "" if h is None else " / ".join(f"{100 * v / h.sum():.1f}" for v in h.tolist())
            yield label, sq, hist


def record_model(name: str, method: str, samples: int, steps: int) -> Recorder:
    spec = get_spec(name)
    fp = load_pretrained(name).eval()
    q = copy.deepcopy(fp)
    exclude = list(spec.quant_exclude)
    cfg = fourbit.SVDQuantConfig(rank=32, exclude=exclude) if method == "svdquant" else fourbit.RTNConfig(exclude=exclude)
    loop = calibration_forward_loop(16, steps, sampler="ddim", guidance_scale=spec.default_guidance_scale,
                                    seed=10_000, num_classes=spec.num_classes)
    fourbit.quantize(q, cfg, forward_loop=loop)
    group = 64
    rec = Recorder({label: make_format(n) for label, n in FORMATS.items()})
    # Record what each quantized layer's activation quantizer would see: its (smoothed, padded) input, but run
    # the 16-bit model so that every format sees the same activations.
    fp_layers = dict(fp.named_modules())
    handles = []
    for lname, layer in quantized_layers(q):
        mod = fp_layers[lname]

        def hook(m, args, out, layer=layer):
            x = args[0]
            x2 = conv_rows(m, x) if isinstance(m, torch.nn.Conv2d) else x.reshape(-1, x.shape[-1])
            xs = prepare_activation(layer, x2)
            if xs.shape[1] % group == 0:
                rec(xs[:: max(1, xs.shape[0] // 512)])  # a bounded, deterministic row sample per call
        handles.append(mod.register_forward_hook(hook))
    classes, seeds = sample_plan(samples, 0, spec.num_classes)
    sample(fp, classes, seeds, steps=steps, guidance_scale=spec.default_guidance_scale,
           null_class=spec.num_classes, batch_size=samples)
    for h in handles:
        h.remove()
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fashion-dit,fashion-unet")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None, help="write the markdown table here")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    lines = [f"QuaRTZ on the bundled models' activations: {a.samples} samples x {a.steps} DDIM steps of the 16-bit "
             f"model, every quantized layer's input (<= 512 rows per call); torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| model | inputs | format | SQNR dB | FLAG 0 / 1 / 2 / 3 / 4 (% of LZS groups) |", "|---|---|---|---|---|"]
    for name in a.models.split(","):
        for method, what in (("rtn", "raw"), ("svdquant", "after SVDQuant smoothing")):
            rec = record_model(name, method, a.samples, a.steps)
            for label, sq, hist in rec.rows():
                lines.append(f"| {name} | {what} | {label} | {sq:.2f} | {hist} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
