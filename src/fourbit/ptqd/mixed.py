"""Step-aware mixed precision: choosing an activation bit-width per step, and counting bit-operations (BOPs).

Rule (PTQD): at step t use the smallest activation bit-width whose SNR_Q(t) = ||eps_fp|| / ||Delta|| beats the
schedule's SNR_F(t) = alpha_t^2 / sigma_t^2 = alpha_bar_t / (1 - alpha_bar_t); if none does, the largest.
Early (noisy) steps have a tiny SNR_F, so the low width suffices there; the last steps need the high one.

BOPs of one sampling run: for every matmul layer and every forward, MACs x weight bits x activation bits.
Quantized layers count their 4/8-bit weights and the activation width in use at that step; their 16-bit
low-rank branch (SVDQuant) and every layer left in 16 bit count 16 x 16. Attention's activation-activation
products (QK^T, AV) and elementwise work are not counted: the count covers Linear and Conv2d layers only.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import nn

from ..nn import QuantConv2d, QuantLinear
from .stats import PTQDStats


def choose_schedule(stats: PTQDStats, labels: Optional[Sequence[str]] = None, squared: bool = False) -> list:
    """One format label per step by PTQD's rule. ``labels``: the candidates (default: all measured formats);
    ``squared``: compare the power ratio ||eps_fp||^2 / ||Delta||^2 instead of the spec's norm ratio."""
    labels = list(labels or stats.formats)
    if not labels:
        raise ValueError("no candidate activation formats")
    by_bits = sorted(labels, key=lambda lb: stats.for_format(lb).bits)
    out = []
    for i, snr_f in enumerate(stats.snr_f):
        chosen = by_bits[-1]
        for lb in by_bits:
            q = stats.formats[lb].snr_q[i]
            if (q * q if squared else q) > snr_f:
                chosen = lb
                break
        out.append(chosen)
    return out


def format_schedule(stats: PTQDStats, schedule: Optional[Sequence[str]] = None) -> str:
    """The schedule in one line per run of equal formats, e.g. ``int4: steps 0-6 (t 999..684); int8: ...``."""
    schedule = list(schedule or stats.schedule or [])
    if not schedule:
        return "(no schedule)"
    parts, start = [], 0
    for i in range(1, len(schedule) + 1):
        if i == len(schedule) or schedule[i] != schedule[start]:
            t0, t1 = stats.timesteps[start], stats.timesteps[i - 1]
            parts.append(f"{schedule[start]}: steps {start}-{i - 1} (t {t0}..{t1})")
            start = i
    return "; ".join(parts)


class BOPCounter:
    """Sampler hook that counts the bit-operations of the sampling runs it is passed to.

    Forward hooks are registered on the model in ``before_step`` and removed in ``on_eps``, so the count covers
    exactly the model evaluations of the sampler (and nothing is left attached). Each layer's ``act_format`` is
    read at forward time, so per-step precision switches by other hooks are counted whatever the hook order.
    ``info``: a dict updated with ``result()`` after the last step of every batch.
    """

    def __init__(self, info: Optional[dict] = None, compare_bits: Sequence[int] = (4, 8)) -> None:
        self.fp_bops = 0  # 16 x 16 work: unquantized layers and low-rank branches
        self.wmacs = 0  # sum over quantized GEMMs of MACs x weight bits (times a_bits gives their BOPs)
        self.q_bops = 0  # the quantized GEMMs' BOPs at the activation widths actually used
        self.macs = 0
        self.forwards = 0
        self.images = 0
        self.info = info
        self.compare_bits = tuple(compare_bits)
        self._handles: list = []

    # ---- counting -----------------------------------------------------------------------------
    def _count(self, module: nn.Module, inputs, output) -> None:
        if isinstance(module, QuantLinear):
            if isinstance(module, QuantConv2d):
                rows = output.numel() // module.out_features  # B * Ho * Wo
            else:
                rows = inputs[0].numel() // module.in_features
            k, n = module.in_features, module.out_features
            macs = rows * k * n
            wbits = module.weight_format.code_bits
            abits = 16 if module.act_format is None else module.act_format.code_bits
            self.wmacs += macs * wbits
            self.q_bops += macs * wbits * abits
            lr = rows * module.rank * (k + n)
            self.fp_bops += lr * 256
            self.macs += macs + lr
        elif isinstance(module, nn.Linear):
            macs = inputs[0].numel() // module.in_features * module.in_features * module.out_features
            self.fp_bops += macs * 256
            self.macs += macs
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs = output.numel() * (module.in_channels // module.groups) * kh * kw
            self.fp_bops += macs * 256
            self.macs += macs

    def before_step(self, step, model: nn.Module) -> None:
        self._remove()
        for m in model.modules():
            if isinstance(m, (QuantLinear, nn.Linear, nn.Conv2d)):
                self._handles.append(m.register_forward_hook(self._count))

    def on_eps(self, step, x_t, eps):
        self._remove()
        self.forwards += 1
        if step.index == 0:
            self.images += x_t.shape[0]
        if self.info is not None and step.is_last:
            self.info.update(self.result())
        return eps

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- results ------------------------------------------------------------------------------
    @property
    def bops(self) -> int:
        return self.fp_bops + self.q_bops

    def bops_if(self, abits: int) -> int:
        """The BOPs the same run would have cost with every quantized layer at ``abits``-bit activations."""
        return self.fp_bops + self.wmacs * abits

    def result(self) -> dict:
        """JSON-able totals: BOPs, per image, and relative to all-A{b} runs for ``compare_bits``."""
        out = {"bops": self.bops, "bops_per_image": self.bops / max(self.images, 1), "images": self.images,
               "macs": self.macs, "bops_16bit_part": self.fp_bops,
               "bops_fraction_16bit": self.fp_bops / self.bops if self.bops else math.nan}
        for b in self.compare_bits:
            out[f"bops_vs_all_a{b}"] = self.bops / self.bops_if(b) if self.bops_if(b) else math.nan
        return out
