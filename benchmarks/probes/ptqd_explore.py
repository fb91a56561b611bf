"""Why does PTQD's correction hurt W4A4 on the bundled models? Variants of the correction, side by side.

For one (model, variant) and each eta, with the same evaluation seeds as ``fourbit ptqd-ablation``:

  none              the quantized model
  +k                eps / (1 + k_t)                       (PTQD's correlated correction)
  +mu               eps - mu_t,c                          (PTQD's bias correction, per channel)
  +k+mu             (eps - mu_t,c) / (1 + k_t)            (PTQD, eta 0; + VSC at eta > 0)
  +k+mu(pixel)      the bias per pixel instead of per channel
  closed-loop k+mu  k and mu measured on the quantized model's own trajectories (eps_fp evaluated at the
                    quantized x_t) instead of on 16-bit trajectories
  noclip none / noclip +k+mu   the same without x0 clipping in the sampler (its own 16-bit reference)

Statistics from ``--stats-samples`` trajectories on seeds 20000.., evaluation on seeds 0..N-1. Writes a markdown
table (LPIPS, FD-Alex, PSNR vs the 16-bit samples of the same seeds, 95% bootstrap intervals) to --out.

    python benchmarks/probes/ptqd_explore.py --model fashion-dit --variant rtn:w4a4 --samples 256 --device cuda
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from fourbit import quantize
from fourbit.eval import compare_images
from fourbit.harness.variants import parse_variant
from fourbit.models import get_spec, load_pretrained
from fourbit.ptqd import collect_stats
from fourbit.ptqd.hooks import vsc_sigma
from fourbit.sampling import calibration_forward_loop, guided_eps, sample, sample_plan


class Moments:
    """Per-step streaming sums of e = eps_fp and d = eps_q - eps_fp, pooled and per pixel."""

    def __init__(self, steps: int):
        self.n = [0] * steps
        self.se = [0.0] * steps
        self.sd = [0.0] * steps
        self.sed = [0.0] * steps
        self.see = [0.0] * steps
        self.pix_d = [None] * steps
        self.pix_e = [None] * steps
        self.samples = [0] * steps

    def update(self, i: int, e: torch.Tensor, d: torch.Tensor) -> None:
        e, d = e.double(), d.double()
        self.n[i] += e.numel()
        self.se[i] += float(e.sum())
        self.sd[i] += float(d.sum())
        self.sed[i] += float((e * d).sum())
        self.see[i] += float((e * e).sum())
        pd, pe = d.sum(0), e.sum(0)  # (C, H, W)
        self.pix_d[i] = pd if self.pix_d[i] is None else self.pix_d[i] + pd
        self.pix_e[i] = pe if self.pix_e[i] is None else self.pix_e[i] + pe
        self.samples[i] += e.shape[0]

    def k_mu(self, i: int):
        n = self.n[i]
        me, md = self.se[i] / n, self.sd[i] / n
        cov = self.sed[i] / n - me * md
        var = self.see[i] / n - me * me
        k = max(cov / var, 0.0) if var > 0 else 0.0
        mu = md - k * me
        mu_pix = (self.pix_d[i] - k * self.pix_e[i]) / self.samples[i]
        return k, mu, mu_pix.float()


class Record:
    """Hook on the trajectory's model: evaluate the other model at the same x_t, accumulate Moments."""

    def __init__(self, other, classes, moments: Moments, null_class: int, other_is_fp: bool):
        self.other, self.classes, self.m, self.null, self.other_is_fp = other, classes, moments, null_class, other_is_fp

    def on_eps(self, step, x_t, eps):
        other = guided_eps(self.other, x_t, step.t, self.classes.to(x_t.device), step.guidance_scale, self.null)
        e_fp, e_q = (other, eps) if self.other_is_fp else (eps, other)
        self.m.update(step.index, e_fp, e_q - e_fp)
        return eps


class Correct:
    """eps -> (eps - mu) / (1 + k) per step; optional VSC with the library's formula."""

    def __init__(self, ks, mus, sigma_q=None):
        self.ks, self.mus, self.sigma_q = ks, mus, sigma_q

    def on_eps(self, step, x_t, eps):
        k, mu = self.ks[step.index], self.mus[step.index]
        if mu is not None:
            eps = eps - (mu.to(eps.device) if torch.is_tensor(mu) else mu)
        return eps / (1 + k)

    def adjust_sigma(self, step, sigma):
        if self.sigma_q is None:
            return sigma
        return vsc_sigma(step, sigma, self.ks[step.index], self.sigma_q[step.index])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fashion-dit")
    p.add_argument("--variant", default="rtn:w4a4")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--stats-samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--etas", default="0,1")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--fd-boot", type=int, default=20)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = get_spec(a.model)
    g, null = spec.default_guidance_scale, spec.num_classes
    fp = load_pretrained(a.model, device=device).eval()
    v = parse_variant(a.variant)
    out = {"settings": vars(a), "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "tables": {}}
    lines = [f"## {a.model} {a.variant}: {a.samples} samples, DDIM {a.steps}, guidance {g}; statistics from "
             f"{a.stats_samples} trajectories ({out['device']}, torch {torch.__version__}, {out['date']})"]
    for eta in [float(e) for e in a.etas.split(",")]:
        q = copy.deepcopy(fp)
        cfg = v.config(exclude=spec.quant_exclude, policies=spec.quant_policies)
        quantize(q, cfg, forward_loop=calibration_forward_loop(a.calib_samples, a.steps, guidance_scale=g,
                 seed=10_000, num_classes=null, eta=eta, batch_size=256))
        classes, seeds = sample_plan(a.samples, 0, null)
        s_classes, s_seeds = sample_plan(a.stats_samples, 20_000, null)

        def run(model, hooks=(), clip=True, cl=classes, sd=seeds):
            return sample(model, cl, sd, steps=a.steps, eta=eta, guidance_scale=g, hooks=list(hooks),
                          batch_size=max(len(sd), 1), device=device, null_class=null, clip_x0=clip)

        lib = collect_stats(fp, q, steps=a.steps, eta=eta, guidance_scale=g, num_samples=a.stats_samples,
                            seed=20_000, num_classes=null, model_name=a.model, batch_size=256, device=device)
        fs = lib.formats[lib.base]
        mom = Moments(a.steps)
        run(fp, [Record(q, s_classes, mom, null, other_is_fp=False)], cl=s_classes, sd=s_seeds)
        cl_mom = Moments(a.steps)
        run(q, [Record(fp, s_classes, cl_mom, null, other_is_fp=True)], cl=s_classes, sd=s_seeds)
        nc_mom = Moments(a.steps)
        run(fp, [Record(q, s_classes, nc_mom, null, other_is_fp=False)], clip=False, cl=s_classes, sd=s_seeds)
        kmu = [mom.k_mu(i) for i in range(a.steps)]
        ks, mus, mus_pix = [x[0] for x in kmu], [x[1] for x in kmu], [x[2] for x in kmu]
        cl = [cl_mom.k_mu(i) for i in range(a.steps)]
        nc = [nc_mom.k_mu(i) for i in range(a.steps)]
        zero = [0.0] * a.steps
        none_mu = [None] * a.steps
        vsc = fs.sigma_q if eta > 0 else None
        rows = {
            "none": ([], True),
            "+k": ([Correct(ks, none_mu)], True),
            "+mu": ([Correct(zero, mus)], True),
            "+k+mu" + (" +VSC" if vsc else ""): ([Correct(ks, mus, vsc)], True),
            "+k+mu(pixel)": ([Correct(ks, mus_pix)], True),
            "closed-loop +k+mu": ([Correct([c[0] for c in cl], [c[1] for c in cl])], True),
            "noclip none": ([], False),
            "noclip +k+mu": ([Correct([c[0] for c in nc], [c[1] for c in nc])], False),
        }
        ref = {True: run(fp), False: run(fp, clip=False)}
        table = {}
        lines += ["", f"### eta = {eta:g}", "",
                  f"library stats: k max {max(fs.k):.4f}, own k max {max(ks):.4f}, closed-loop k max "
                  f"{max(c[0] for c in cl):.4f}, noclip k max {max(c[0] for c in nc):.4f}; "
                  f"mu range [{min(mus):.4f}, {max(mus):.4f}], closed-loop mu range "
                  f"[{min(c[1] for c in cl):.4f}, {max(c[1] for c in cl):.4f}]", "",
                  "| row | LPIPS | FD vs 16-bit | PSNR dB |", "|---|---|---|---|"]
        for name, (hooks, clip) in rows.items():
            imgs = run(q, hooks, clip=clip)
            m = compare_images(imgs, ref[clip], None, n_boot=500, fd_n_boot=a.fd_boot, seed=0, device=device)
            table[name] = {k: m[k] for k in ("lpips", "psnr", "fd_vs_reference")}
            li, fd, ps = m["lpips"], m["fd_vs_reference"], m["psnr"]
            lines.append(f"| {name} | {li['mean']:.3f} [{li['lo']:.3f}, {li['hi']:.3f}] | "
                         f"{fd['value']:.1f} [{fd['lo']:.1f}, {fd['hi']:.1f}] | {ps['mean']:.2f} |")
            print(lines[-1], flush=True)
        out["tables"][f"eta{eta:g}"] = {"rows": table, "k": ks, "mu": mus, "k_closed_loop": [c[0] for c in cl],
                                        "mu_closed_loop": [c[1] for c in cl], "k_noclip": [c[0] for c in nc],
                                        "k_library": fs.k, "sigma_q": fs.sigma_q}
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(a.out + ".json", "w") as f:
        json.dump(out, f, indent=1, default=lambda o: o.tolist() if torch.is_tensor(o) else str(o))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
