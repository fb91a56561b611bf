"""Timing several variants side by side: CUDA graphs replayed in alternation on a GPU, wall clock elsewhere.

Used by ``fourbit.plan_precision`` and by the benchmark scripts (``benchmarks/_util`` re-exports these).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def capture_graph(fns: Sequence[Callable[[], object]], min_calls: int = 12):
    """(graph, calls): one CUDA graph of ``calls`` calls rotating over ``fns``, after a warm-up outside it."""
    calls = max(min_calls, len(fns))
    for fn in fns:  # warm caches (compilation, layer state) outside the capture
        fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fns[i % len(fns)]()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    return g, calls


class InterleavedGraphs:
    """Time several variants side by side: each is captured once (``capture_graph``), then every round replays
    all of them in turn, so slow drifts of the GPU's clock or temperature touch every variant alike; the
    result per variant is the median over rounds of ms per call."""

    def __init__(self, min_calls: int = 12):
        self.min_calls = min_calls
        self.items: list = []  # (graph, calls, fns: kept alive, the graph reads their tensors)

    def add(self, fns: Sequence[Callable[[], object]]) -> int:
        g, calls = capture_graph(fns, self.min_calls)
        return self.add_captured(g, calls, fns)

    def add_captured(self, g, calls: int, keep: object) -> int:
        """A graph captured elsewhere (``capture_graph``) of ``calls`` calls; ``keep``: what it reads (kept alive)."""
        self.items.append((g, calls, keep))
        return len(self.items) - 1

    def run(self, rounds: int = 20) -> list[float]:
        times: list[list[float]] = [[] for _ in self.items]
        for _ in range(rounds):
            events = []
            for g, calls, _ in self.items:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                events.append((a, b, calls))
            torch.cuda.synchronize()
            for t, (a, b, calls) in zip(times, events):
                t.append(a.elapsed_time(b) / calls)
        self.items.clear()
        return [float(statistics.median(t)) for t in times]


def time_side_by_side(variants: dict, rounds: int = 20, min_calls: int = 12, device="cuda") -> dict:
    """{name: median ms per call} for ``variants`` = {name: [closures]} (each list rotates over its inputs):
    CUDA graphs replayed in alternation when ``device`` is a CUDA device, else wall-clock rounds in alternation
    (CPU: the numbers rank the reference kernels, not the GPU kernels)."""
    if torch.device(device).type == "cuda":
        bench = InterleavedGraphs(min_calls)
        names = list(variants)
        for name in names:
            bench.add(variants[name])
        return dict(zip(names, bench.run(rounds)))
    times: dict = {name: [] for name in variants}
    for fns in variants.values():  # warm-up
        for fn in fns:
            fn()
    for _ in range(rounds):
        for name, fns in variants.items():
            t0 = time.perf_counter()
            for fn in fns:
                fn()
            times[name].append((time.perf_counter() - t0) * 1e3 / len(fns))
    return {name: float(statistics.median(t)) for name, t in times.items()}
