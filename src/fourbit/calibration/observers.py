"""Observers attached to layers during calibration: per-channel statistics and a bounded row sample.

Memory per layer is O(K) for the statistics plus O(max_rows * K) for the sample, however long the
user's forward loop runs. The sample is a uniform random subset of all rows seen (priority sampling): each
row's key is a seeded hash of the row's own bits, so the sample depends only on the set of rows seen, never
on the order of the calls, how the loop batches them, or how they are split across processes. Partial
statistics (one per process) merge exactly with ``merge_partials``: max of maxima, top keys of the samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..nn.linear import conv_rows


class CalibrationError(RuntimeError):
    """Raised when calibration data is unusable (NaN/Inf inputs, a layer never called, ...)."""


@dataclass
class LayerStats:
    """What calibration learned about one layer's input (K = in_features, unpadded).

    absmax: (K,) fp32 max |x| per input channel over every row seen
    rows:   (n, K) fp32 a uniform sample of at most ``max_rows`` input rows (n <= max_rows)
    rows_seen: total number of rows observed; calls: number of forward calls observed
    """

    absmax: Tensor
    rows: Tensor
    rows_seen: int
    calls: int

    @property
    def zero_channels(self) -> int:
        """Input channels that were exactly zero in every row seen (smoothing cannot size them)."""
        return int((self.absmax == 0).sum())


@dataclass
class PartialStats:
    """One process's share of a layer's statistics, before the merge (absmax None: no call seen)."""

    absmax: Optional[Tensor]  # (K,) fp32
    rows: Optional[Tensor]  # (n, K) fp32, sorted by key, largest first
    keys: Optional[Tensor]  # (n,) int64 row keys
    rows_seen: int
    calls: int


_MIX1, _MIX2 = -4658895280553007687, -7723592293110705685  # splitmix64 finaliser constants as signed int64


def row_keys(rows: Tensor, coeffs: Tensor, chunk: Optional[int] = None) -> Tensor:
    """A seeded 64-bit hash of each row's fp32 bits: ``(M, K) -> (M,)`` int64, exact on any device.

    Linear hash ``sum_k bits_k * coeffs_k`` (int64 arithmetic wraps, so the sum is exact in any order) followed
    by the splitmix64 finaliser so that every bit of the key is mixed. ``chunk`` rows at a time (default: up to
    2^26 int64 products, 512 MiB, so a layer call is usually one chunk: few launches per call).
    """
    coeffs = coeffs.to(rows.device)
    chunk = chunk or max(1, (1 << 26) // max(1, rows.shape[1]))
    out = []
    for i in range(0, rows.shape[0], chunk):
        bits = rows[i:i + chunk].contiguous().view(torch.int32).to(torch.int64)  # (m, K)
        h = (bits * coeffs).sum(1)  # (m,)
        h = (h ^ _logical_shr(h, 30)) * _MIX1
        h = (h ^ _logical_shr(h, 27)) * _MIX2
        out.append(h ^ _logical_shr(h, 31))
    if len(out) == 1:
        return out[0]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=rows.device)


def _logical_shr(h: Tensor, n: int) -> Tensor:
    return (h >> n) & ((1 << (64 - n)) - 1)


def _top_rows(rows: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` rows with the largest keys, largest first (ties are identical rows, so their order is moot)."""
    top = torch.topk(keys, min(k, keys.numel())).indices
    return rows[top.to(rows.device)], keys[top]


def merge_partials(name: str, parts: list[PartialStats], max_rows: int) -> LayerStats:
    """One layer's statistics from every process's share: exact, and the same for any split of the rows."""
    calls = sum(p.calls for p in parts)
    if calls == 0:
        raise CalibrationError(
            f"layer {name!r} was never called by the forward loop; exclude it from quantization "
            f"(config exclude=[...]) or make the loop exercise it"
        )
    seen = [p for p in parts if p.absmax is not None]
    if not seen:
        raise CalibrationError(
            f"layer {name!r} was called {calls} time(s) but only with empty (zero-row) inputs; "
            f"give the forward loop batches with at least one row"
        )
    absmax = seen[0].absmax
    for p in seen[1:]:
        absmax = torch.maximum(absmax, p.absmax)
    if len(seen) == 1:
        rows = seen[0].rows
    else:
        rows, _ = _top_rows(torch.cat([p.rows for p in seen]), torch.cat([p.keys for p in seen]), max_rows)
    return LayerStats(absmax, rows, sum(p.rows_seen for p in parts), calls)


class InputHealth:
    """NaN/Inf bookkeeping shared by a model's observers, kept on the device: no host sync per layer call.

    Each layer call is numbered on the host (``order``: its step and the layer's call count); an observer adds
    its call's count of non-finite input channels to one flag per device and keeps, on the device, the number and
    count of its first bad call. ``check`` syncs once (once per model forward in ``calibrate``) and raises for the
    earliest bad call.
    """

    def __init__(self):
        self.flags: dict[torch.device, Tensor] = {}
        self.order: list[tuple[int, int]] = []  # per layer call, all observers together: (step, layer's call)

    def record(self, observer: "ActivationObserver", bad: Tensor, step: int) -> None:
        flag = self.flags.get(bad.device)
        self.flags[bad.device] = bad if flag is None else flag + bad
        hit = (bad > 0) & (observer.first_bad[0] < 0)  # first_bad: (2,) int64 [call number, count]; -1 = none
        observer.first_bad = torch.where(hit, torch.stack([bad.new_full((), len(self.order)), bad]),
                                         observer.first_bad)
        self.order.append((step, observer.calls))

    def check(self, observers: list) -> None:
        """Raise ``CalibrationError`` for the earliest call that saw NaN/Inf inputs, if any (one sync per device)."""
        if not any(int(f) for f in self.flags.values()):
            return
        firsts = [(o, o.first_bad.tolist()) for o in observers if o.first_bad is not None]
        obs, (number, count) = min(((o, f) for o, f in firsts if f[0] >= 0), key=lambda of: of[1][0])
        step, call = self.order[number]
        raise CalibrationError(
            f"layer {obs.name!r} received NaN/Inf inputs in {count} input channel(s) at calibration step {step} "
            f"(call {call} of this layer). Check the forward loop's inputs and the model in 16-bit before "
            f"quantizing."
        )


class ActivationObserver:
    """Forward pre-hook recording a layer's input statistics.

    Everything stays on the device of the layer's inputs while the loop runs (per-channel maxima, the row sample
    and its keys, the NaN/Inf count): a call launches a few kernels and never waits for them. ``partial``
    moves the result to the CPU once at the end.
    """

    def __init__(self, name: str, module: nn.Module, max_rows: int, seed: int, step_counter: list,
                 health: Optional[InputHealth] = None):
        self.name = name
        self.module = module
        self.max_rows = max_rows
        self.coeffs: Optional[Tensor] = None  # (K,) int64 hash coefficients, drawn on first call
        self.seed = seed
        self.step_counter = step_counter  # shared [int]: model-level forward calls so far
        self.health = health if health is not None else InputHealth()
        self.first_bad: Optional[Tensor] = None  # (2,) int64 on the inputs' device, see InputHealth.record
        self.absmax: Optional[Tensor] = None
        self.rows: Optional[Tensor] = None
        self.keys: Optional[Tensor] = None
        self.rows_seen = 0
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def to_rows(self, x: Tensor) -> Tensor:
        if isinstance(self.module, nn.Conv2d):
            return conv_rows(self.module, x)
        return x.reshape(-1, x.shape[-1])

    @torch.no_grad()
    def __call__(self, module: nn.Module, args) -> None:
        x = args[0]
        self.calls += 1
        rows = self.to_rows(x.detach()).float()  # (M, K)
        if rows.shape[0] == 0:  # an empty batch: nothing to learn from this call
            return
        if self.first_bad is None:
            self.first_bad = torch.full((2,), -1, dtype=torch.int64, device=rows.device)
        amax = rows.abs().amax(dim=0)  # (K,); NaN/Inf where a row had one in that channel
        self.health.record(self, torch.isfinite(amax).logical_not_().sum(), self.step_counter[0])
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.rows_seen += rows.shape[0]
        if self.coeffs is None:
            g = torch.Generator().manual_seed(self.seed)
            self.coeffs = (torch.randint(0, 2**62, (rows.shape[1],), generator=g, dtype=torch.int64) * 2 + 1
                           ).to(rows.device)
        keys = row_keys(rows, self.coeffs)
        if self.rows is not None:  # one merge of the kept sample with every new row: few launches per call
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        self.rows, self.keys = _top_rows(rows, keys, self.max_rows)

    def partial(self) -> PartialStats:
        """This process's share, on the CPU (no check: a layer may be called on another rank only)."""
        self.handle.remove()
        self.health.check([self])
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return PartialStats(cpu(self.absmax), cpu(self.rows), cpu(self.keys), self.rows_seen, self.calls)

    def finish(self) -> LayerStats:
        """The statistics of a single-process run (CalibrationError if the layer was never called)."""
        return merge_partials(self.name, [self.partial()], self.max_rows)

    def remove(self) -> None:
        self.handle.remove()
