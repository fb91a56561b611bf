"""Tile configs of the scaled GEMM by shape: ``GemmConfig``, the measured table and the candidates it may name.

``scaled_gemm`` (``gemm.py``) takes the first row of ``TABLE`` whose device class, operand kind and M / N / K
ranges hold the problem; where no row does, it takes ``gemm.rule_config``, the rule tuned on FLUX.1 shapes on an
H100 (128x256x128 tiles, 64x128 for few tiles of few rows, stream-K from K = 8192). Rows are data, chosen by
``benchmarks/gemm_tune.py`` (which prints them) and each cites the result row that chose it. Only tiles, stages,
warps and the schedule change between rows: the result is the same up to the fp32 summation order.

Lookups are deterministic (no autotuning at run time) and cached per shape.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and schedule. ``persistent``: one program per SM looping over tiles (else one per tile).
    ``precise``: fp8 only: promote the tensor-core accumulator to fp32 every BK (max_num_imprecise_acc); any
    operands: a 16-bit up-projection's fp32 lr goes into the epilogue's branch as hi + lo (``gemm.add_branch``).
    ``stream_k``: a persistent launch's last, partial wave of tiles is shared out by K iterations.
    ``split_k``: a launch with fewer tiles than SMs shares all its tiles' K iterations out over the SMs (the same
    stream-K fix-up: each tile's partial sums are added in program order by the program that holds its last K
    tile; deterministic). Both: fp8 / 16-bit operands only (an int8 launch runs them data-parallel)."""

    BM: int = 128
    BN: int = 256
    BK: int = 128
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3
    persistent: bool = True
    flatten: bool = False
    precise: bool = False
    tma_store: bool = False
    stream_k: bool = False
    split_k: bool = False

    def key(self) -> str:
        return (f"{self.BM}x{self.BN}x{self.BK}-g{self.GROUP_M}-w{self.num_warps}-s{self.num_stages}"
                + "".join(f"-{tag}" for tag, name in _FLAGS if getattr(self, name)))

    @classmethod
    def from_key(cls, key: str) -> "GemmConfig":
        """The config whose ``key()`` is ``key`` (as the table and the sweep's results write them)."""
        head, *parts = key.split("-")
        try:
            bm, bn, bk = (int(v) for v in head.split("x"))
            nums = {p[0]: int(p[1:]) for p in parts[:3]}
            group, warps, stages = nums["g"], nums["w"], nums["s"]
        except (ValueError, KeyError):
            raise ValueError(f"GemmConfig key {key!r} does not start like '128x256x128-g8-w8-s3'; "
                             "write it as GemmConfig.key() does") from None
        flags = dict(_FLAGS)
        unknown = [p for p in parts[3:] if p not in flags]
        if unknown:
            raise ValueError(f"GemmConfig key {key!r} has unknown parts {unknown}; known flags: {sorted(flags)}")
        cfg = cls(bm, bn, bk, group, warps, stages, **{name: tag in parts[3:] for tag, name in _FLAGS})
        if cfg.key() != key:
            raise ValueError(f"GemmConfig key {key!r} is not in key() order; write it as {cfg.key()!r}")
        return cfg


#: key tag -> boolean field, in key() order
_FLAGS = (("p", "persistent"), ("f", "flatten"), ("acc", "precise"), ("tma", "tma_store"), ("sk", "stream_k"),
          ("split", "split_k"))


@dataclass(frozen=True)
class Row:
    """Problems with ``lo < M <= hi`` (and the same for N and K) of an operand kind on a device class run with
    ``config`` (a ``GemmConfig.key()``); ``source`` names the result row that chose it."""

    device: str  # ``_common.device_class``: "sm90" = compute capability 9.0 (H100, H200)
    operands: str  # "fp8", "int8" or "16" (bf16 / fp16)
    m: tuple[int, int]
    n: tuple[int, int]
    k: tuple[int, int]
    config: str
    source: str

    def holds(self, m: int, n: int, k: int, operands: str, device: str) -> bool:
        return (self.device == device and self.operands == operands and self.m[0] < m <= self.m[1]
                and self.n[0] < n <= self.n[1] and self.k[0] < k <= self.k[1])


#: bucket edges the sweep groups its shapes by (a row covers one cell: (edge i, edge i+1] in each dimension); the
#: family shapes fall as: M 1-2 | 154 | 512-1024 | 2048 | 4096-4608 | 8192, N and K 640 ... 21504
M_EDGES = (0, 16, 256, 1024, 2048, 4096, 8192, 1 << 30)
N_EDGES = (0, 1024, 2048, 4096, 8192, 1 << 30)
K_EDGES = (0, 2048, 4096, 8192, 1 << 30)

#: the measured rows, first match wins; a problem no row holds takes ``gemm.rule_config``. Paste the rows
#: ``benchmarks/gemm_tune.py`` prints (it prints a row only where a config beat the rule in that cell).
TABLE: tuple[Row, ...] = (
    Row("sm90", "fp8", (0, 16), (0, 1024), (0, 2048), "64x128x128-g8-w4-s4-p-tma",
        "linear_tune 2026-12-04 (H200): 2x1280x640 (MxKxN), 1.05x the rule"),
    Row("sm90", "fp8", (16, 256), (1024, 2048), (0, 2048), "128x64x128-g8-w4-s4-p-tma",
        "linear_tune 2026-12-04 (H200): 154x2048x1280 (MxKxN), 1.06x the rule"),
    Row("sm90", "fp8", (256, 1024), (1024, 2048), (4096, 8192), "64x128x128-g8-w4-s4-p-tma",
        "linear_tune 2026-12-04 (H200): 666x6144x1536 (MxKxN), 1.83x the rule"),
    Row("sm90", "fp8", (256, 1024), (2048, 4096), (0, 2048), "128x64x128-g8-w4-s4-tma",
        "linear_tune 2026-12-04 (H200): 600x1152x2304 (MxKxN), 1.46x the rule"),
    Row("sm90", "fp8", (256, 1024), (4096, 8192), (0, 2048), "64x256x128-g8-w8-s4-p-tma",
        "linear_tune 2026-12-04 (H200): 666x1536x4608, 666x1536x6144 (MxKxN), 1.08x the rule"),
    Row("sm90", "fp8", (256, 1024), (8192, 1 << 30), (2048, 4096), "128x64x128-g8-w4-s4-tma",
        "linear_tune 2026-12-04 (H200): 512x3072x9216, 512x3072x12288 (MxKxN), 1.06x the rule"),
    Row("sm90", "fp8", (1024, 2048), (2048, 4096), (2048, 4096), "128x128x128-g8-w4-s4-tma",
        "linear_tune 2026-12-04 (H200): 2048x2240x2240 (MxKxN), 1.08x the rule"),
    Row("sm90", "fp8", (1024, 2048), (2048, 4096), (4096, 8192), "128x128x128-g8-w4-s4-tma",
        "linear_tune 2026-12-04 (H200): 2048x5632x2240 (MxKxN), 1.15x the rule"),
    Row("sm90", "fp8", (2048, 4096), (2048, 4096), (8192, 1 << 30), "128x256x128-g8-w8-s3-p-tma",
        "linear_tune 2026-12-04 (H200): 4096x12288x3072 (MxKxN), 1.04x the rule"),
    Row("sm90", "fp8", (4096, 8192), (0, 1024), (0, 2048), "128x64x128-g8-w4-s3-tma",
        "linear_tune 2026-12-04 (H200): 8192x640x640 (MxKxN), 1.05x the rule"),
    Row("sm90", "fp8", (4096, 8192), (0, 1024), (2048, 4096), "128x128x128-g8-w4-s4-p-tma",
        "linear_tune 2026-12-04 (H200): 8192x2560x640 (MxKxN), 1.10x the rule"),
)

_CACHE: dict = {}
_CACHED_TABLE: list = [None]
_MISS = object()


def lookup(m: int, n: int, k: int, operands: str, device: str) -> Optional[str]:
    """The config key of the first row of ``TABLE`` that holds this problem, or None; cached per problem (the
    cache follows ``TABLE`` when the module attribute is replaced)."""
    table = TABLE
    if _CACHED_TABLE[0] is not table:
        _CACHE.clear()
        _CACHED_TABLE[0] = table
    key = (m, n, k, operands, device)
    hit = _CACHE.get(key, _MISS)
    if hit is _MISS:
        hit = next((row.config for row in table if row.holds(m, n, k, operands, device)), None)
        _CACHE[key] = hit
    return hit


# ---- the configs the sweep times (and so the only ones a row may name) ------------------------------------------
#: (BM, BN, warps): the fp32 accumulator at most 128 registers per thread (BM x BN / (32 x warps)), 8 warps only
#: where a warp group would otherwise hold more than 64 x 128
TILES = ((64, 64, 4), (64, 128, 4), (64, 256, 4), (64, 256, 8), (128, 64, 4), (128, 128, 4), (128, 128, 8),
         (128, 256, 8))
STAGES = (3, 4)
#: shared memory per SM on sm90 (227 KiB): the K pipeline (stages x (BM + BN) x BK operand bytes) plus the output
#: tile the TMA store stages (BM x BN x 2 bytes) must fit; the low-rank branch's operands are checked by launching
#: (``gemm.launch_with_fewer_stages`` reports a config that needed fewer stages)
SMEM_BYTES = 232448


def fits(cfg: GemmConfig, operand_bytes: int = 1, smem: int = SMEM_BYTES) -> bool:
    """Whether the config's pipeline and store tile fit ``smem`` bytes for operands of ``operand_bytes`` bytes."""
    pipeline = cfg.num_stages * (cfg.BM + cfg.BN) * cfg.BK * operand_bytes
    return pipeline + (cfg.BM * cfg.BN * 2 if cfg.tma_store else 0) <= smem


def candidates(operand_bytes: int = 1, bk: int = 128) -> list[GemmConfig]:
    """The plain candidates (TMA store, GROUP_M 8): ``TILES`` x ``STAGES`` x persistent on / off, those that fit.
    ``schedules`` adds the stream-K / split-K variants of the persistent ones."""
    out = []
    for bm, bn, warps in TILES:
        for stages in STAGES:
            for persistent in (True, False):
                cfg = GemmConfig(bm, bn, bk, 8, warps, stages, persistent, tma_store=True)
                if fits(cfg, operand_bytes):
                    out.append(cfg)
    return out


def schedules(cfg: GemmConfig) -> list[GemmConfig]:
    """The stream-K and split-K variants of a persistent candidate (none for a non-persistent one)."""
    if not cfg.persistent:
        return []
    return [replace(cfg, stream_k=True), replace(cfg, split_k=True)]


def cell(value: int, edges: tuple[int, ...]) -> tuple[int, int]:
    """The (lo, hi] bucket of ``edges`` that holds ``value``."""
    for lo, hi in zip(edges, edges[1:]):
        if lo < value <= hi:
            return lo, hi
    raise ValueError(f"{value} lies outside the bucket edges {edges}")
