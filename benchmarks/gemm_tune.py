"""GEMM tiles and few-row paths by shape: time the candidates at every model family's layer shapes, print table rows.

    python benchmarks/gemm_tune.py                        # five families, all three sweeps; H100/H200, < 4 min
    python benchmarks/gemm_tune.py --families pixart-sigma,flux --what gemm
    python benchmarks/gemm_tune.py --what gemm --operands int8    # the int8 (W8A8) GEMM's rows
    python benchmarks/gemm_tune.py --quick                # 4 shapes, 6 candidates: a smoke test of the script

Sweeps (``--what``):
  gemm  the fp8 (``--operands``: or int8) ``scaled_gemm`` (rank-32 epilogue + bias, bf16 out, as a W4A4 layer runs
        it) at each family's shapes
        (``linear.FAMILY_SHAPES`` and the conditioning layers ``FAMILY_FEW_ROWS``) with every candidate of
        ``gemm_table.candidates()`` and its stream-K / split-K variants (128-row tiles left out for M <= 64), beside
        bf16 ``F.linear`` and the current default; a candidate whose output is further than ``MAX_REL_ERR`` from the
        fp32 twin, or that needed fewer pipeline stages than it names, is reported and left out
  gemv  the int4p2 W4A4 r32 layer at the conditioning shapes and M = 1, 2, 4: the GEMV on the packed weight vs
        act_quant + GEMM (``GemvConfig.max_m``)
  act   act_quant with the rank-32 branch at the family shapes: its two launches vs the single pass + cuBLAS
        down-projection, on one stream or a side stream (``ActConfig.lr_mm_rows`` / ``lr_mm_stream_max_k``)
Timing: per shape, one CUDA graph per variant of >= 12 calls rotating over operand sets of more than twice the L2
(weights too: each call reads its weight from memory, as in a model), all variants of the shape replayed in
alternation for ``--rounds`` rounds (``_util.InterleavedGraphs``), median ms per call.
Compilation: ``--jobs`` worker processes run each (candidate, shape) once first, one process per kernel (Triton's
on-disk cache), so the timing process only loads the kernels.
Output: one row appended to ``results/linear_tune.jsonl`` (variant "shapes"), the per-shape tables, and the rows for
``fourbit/kernels/gemm_table.py``: per bucket cell of ``gemm_table.M_EDGES`` x ``N_EDGES`` x ``K_EDGES``, the
candidate with the least geometric-mean time over the cell's shapes, printed where it beats the rule
(``gemm.rule_config``) by ``--min-gain`` or more; the recommended ``max_m`` and act_quant thresholds.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import (RESULTS_DIR, InterleavedGraphs, append_row, environment, geomean, md_table, next_run,  # noqa: E402
                   run_meta)
from linear import FAMILY_FEW_ROWS, FAMILY_SHAPES, L2_BYTES, RANK, inputs, make_layer  # noqa: E402

FP8 = torch.float8_e4m3fn
#: ``--operands`` -> operand dtype (the table's operand kinds)
OPERANDS = {"fp8": FP8, "int8": torch.int8}
#: a candidate further than this from the fp32 twin is left out: the bf16 rounding of the output (tests'
#: SQNR_BF16_OUTPUT_DB)
MAX_REL_ERR = 4e-3
#: operand sets per shape at most (small layers would need hundreds to exceed the L2)
MAX_SETS = 48


# ---- which configs at which shape (pure: tested on CPU) ------------------------------------------------------------
def shape_configs(m: int, n: int, k: int, sms: int, device: str, quick: bool = False, dtype=FP8):
    """(configs to time, aliases) at one shape: each candidate and its stream-K / split-K variants, no 128-row tiles
    for M <= 64, the current default and the rule always. A variant whose launch is its plain config's here is not
    timed: ``aliases`` maps its key to the plain key."""
    from fourbit.kernels import gemm as gm
    from fourbit.kernels import gemm_table as gt

    cands = gt.candidates()
    if quick:
        cands = [c for c in cands if c.num_stages == 3 and c.num_warps == 4 and c.persistent][:3]
    timed, aliases = {}, {}
    for cfg in cands:
        if m <= 64 and cfg.BM > 64:
            continue
        timed[cfg.key()] = cfg
        for var in gt.schedules(cfg):
            if gm.launch_plan(m, n, k, var, dtype, sms) == gm.launch_plan(m, n, k, cfg, dtype, sms):
                aliases[var.key()] = cfg.key()
            else:
                timed[var.key()] = var
    for cfg in (gm.default_config(m, n, k, dtype, sms, device), gm.rule_config(m, n, k, dtype, sms)):
        timed.setdefault(cfg.key(), cfg)
        aliases.pop(cfg.key(), None)
    return list(timed.values()), aliases


def ms_of(res: dict, key: str):
    """A config's time at one shape's result (through its alias), or None if it was not timed there."""
    return res["ms"].get(key, res["ms"].get(res["alias"].get(key, "")))


def derive_rows(results: list[dict], device: str, run: str, min_gain: float) -> list[dict]:
    """Table rows from the gemm sweep: per bucket cell, the candidate timed at all of the cell's shapes with the least
    geometric-mean time, where it beats the rule's by ``min_gain``. A variant counts only where it took effect
    at one of the cell's shapes (else it is its plain config)."""
    from fourbit.kernels import gemm_table as gt

    cells: dict = {}
    for r in results:
        key = (r.get("operands", "fp8"), gt.cell(r["M"], gt.M_EDGES), gt.cell(r["N"], gt.N_EDGES),
               gt.cell(r["K"], gt.K_EDGES))
        cells.setdefault(key, []).append(r)
    rows = []
    for (ops, mc, nc, kc), res in sorted(cells.items()):
        keys = set.intersection(*({k for k in set(r["ms"]) | set(r["alias"]) if ms_of(r, k)} for r in res))
        keys = {k for k in keys if any(k in r["ms"] for r in res)}
        rule = [ms_of(r, r["rule"]) for r in res]
        if not keys or None in rule:
            continue
        geo = {k: geomean([ms_of(r, k) for r in res]) for k in keys}
        best = min(sorted(keys), key=geo.__getitem__)
        gain = geomean(rule) / geo[best]
        if gain >= 1 + min_gain:
            shapes = ", ".join(f"{r['M']}x{r['K']}x{r['N']}" for r in res)
            rows.append(dict(device=device, operands=ops, m=mc, n=nc, k=kc, config=best, gain=gain,
                             source=f"linear_tune {run}: {shapes} (MxKxN), {gain:.2f}x the rule"))
    return rows


def row_code(row: dict) -> str:
    """A derived row as the line to paste into ``gemm_table.TABLE``."""
    def rng(r):
        return "(" + ", ".join("1 << 30" if v == 1 << 30 else str(v) for v in r) + ")"
    return (f'    Row("{row["device"]}", "{row["operands"]}", {rng(row["m"])}, {rng(row["n"])}, {rng(row["k"])}, '
            f'"{row["config"]}",\n        "{row["source"]}"),')


def recommend_max_m(gemv_rows: list[dict], ms=(1, 2, 4)) -> int:
    """The most rows for which the GEMV beat act_quant + GEMM at every conditioning shape (and at all fewer rows)."""
    best = 0
    for m in ms:
        sel = [r for r in gemv_rows if r["M"] == m]
        if not sel or any(r["gemv_ms"] >= r["gemm_ms"] for r in sel):
            break
        best = m
    return best


def recommend_act(act_rows: list[dict]) -> dict:
    """``lr_mm_rows``: the fewest rows from which the single pass + cuBLAS down-projection (either stream) beat the two
    launches at every measured shape with at least that many rows (0: nowhere); ``lr_mm_stream_max_k``: the largest K
    up to which the side stream beat one stream at every such shape (0: nowhere)."""
    def mm(r):
        return min(r["single+mm_ms"], r["single+mm-side_ms"])

    rows = 0
    for m in sorted({r["M"] for r in act_rows}, reverse=True):
        if all(mm(r) < r["two_ms"] for r in act_rows if r["M"] >= m):
            rows = m
        else:
            break
    sel = [r for r in act_rows if rows and r["M"] >= rows]
    kmax = 0
    for k in sorted({r["K"] for r in sel}):
        if all(r["single+mm-side_ms"] <= r["single+mm_ms"] for r in sel if r["K"] <= k):
            kmax = k
        else:
            break
    return dict(lr_mm_rows=rows, lr_mm_stream_max_k=kmax)


# ---- compilation in worker processes --------------------------------------------------------------------------------
def gemm_sets(m: int, n: int, k: int, count: int, dtype=FP8, rank: int = RANK):
    """``count`` operand sets for ``scaled_gemm``: a (m, k) and b (n, k) of ``dtype`` (fp8: small integers; int8: the
    full range), row and column scales, the rank-r branch (lr (m, r), up (n, r) fp32) and a bias (n,)."""
    lim, b_scale = (8, 1e-2) if dtype == FP8 else (127, 1e-4)

    def one():
        a = torch.randint(-lim, lim, (m, k), device="cuda").to(torch.float16).to(dtype)
        b = torch.randint(-lim, lim, (n, k), device="cuda").to(torch.float16).to(dtype)
        return (a, b, torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") * b_scale,
                torch.randn(m, rank, device="cuda"), torch.randn(n, rank, device="cuda") * 1e-2,
                torch.randn(n, device="cuda"))
    return [one() for _ in range(count)]


def compile_groups(plans: dict) -> list[list]:
    """The (operands, config key, (m, n, k)) launches of the sweep (``plans``: {(operands, family, (m, k, n)):
    (configs, aliases)}), grouped by the kernel they compile (operands, tiles, warps, stages: persistence and split-K
    change only the grid), largest group first: one task per worker process."""
    groups: dict = {}
    for (ops, _, (m, k, n)), (configs, _) in plans.items():
        for cfg in configs:
            ident = (ops, cfg.BM, cfg.BN, cfg.BK, cfg.num_warps, cfg.num_stages)
            groups.setdefault(ident, []).append((ops, cfg.key(), (m, n, k)))
    return sorted(groups.values(), key=len, reverse=True)


def _compile_task(launches):
    """Worker: run each (config, shape) once, compiling it into Triton's on-disk cache; the failures."""
    from fourbit.kernels import gemm as gm

    failed = []
    for ops, key, (m, n, k) in launches:
        try:
            gm.scaled_gemm(*gemm_sets(m, n, k, 1, OPERANDS[ops])[0], config=gm.GemmConfig.from_key(key))
            torch.cuda.synchronize()
        except Exception as e:  # reported by the timing process too
            failed.append([ops, key, m, n, k, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"])
    return failed


def compile_all(groups: list, jobs: int, log) -> float:
    """Compile every launch of ``groups`` (``compile_groups``) in ``jobs`` processes; seconds taken."""
    t0 = time.time()
    if jobs <= 1:
        return 0.0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(jobs, len(groups))) as pool:
        for done, failed in enumerate(pool.imap_unordered(_compile_task, groups), 1):
            for f in failed[:2]:
                log(f"  compile failed: {f}")
            log(f"  compiled {done}/{len(groups)} kernels ({time.time() - t0:.0f} s)")
    return time.time() - t0


# ---- timing ---------------------------------------------------------------------------------------------------------
def _count(set_bytes: int) -> int:
    return max(2, min(MAX_SETS, -(-2 * L2_BYTES // set_bytes)))


def rel_err(y, ref) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def time_gemm_shape(ops, family, m, n, k, configs, aliases, rounds, sms, device) -> dict:
    """One shape of the gemm sweep: bf16 and every config side by side; configs that fail, are inexact or needed
    fewer stages are in ``errors``."""
    from fourbit.kernels import gemm as gm

    dtype = OPERANDS[ops]
    sets = gemm_sets(m, n, k, _count(m * k + n * k + 2 * m * n), dtype)
    ref = gm.scaled_gemm_torch(*sets[0], out_dtype=torch.float32)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(_count(2 * (m * k + n * k + m * n)))]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in xs]
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    graphs, names, errors = InterleavedGraphs(), ["bf16"], {}
    graphs.add([lambda x=x, w=w: F.linear(x, w, bias) for x, w in zip(xs, ws)])
    for cfg in configs:
        fns = [lambda s=s, c=cfg: gm.scaled_gemm(*s, config=c) for s in sets]
        try:
            err = rel_err(fns[0](), ref)
            fit = gm._FITTING_STAGES.get((cfg.key(), RANK, dtype, cfg.tma_store, str(sets[0][0].device)),
                                         cfg.num_stages)
            if err > MAX_REL_ERR or fit < cfg.num_stages:
                errors[cfg.key()] = f"rel err {err:.1e}" if err > MAX_REL_ERR else f"fits {fit} stages only"
                continue
            graphs.add(fns)
            names.append(cfg.key())
        except Exception as e:  # a config that does not compile or launch here is reported, not fatal
            errors[cfg.key()] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    times = dict(zip(names, graphs.run(rounds)))
    del sets, xs, ws
    default, rule = gm.default_config(m, n, k, dtype, sms, device), gm.rule_config(m, n, k, dtype, sms)
    return dict(operands=ops, family=family, M=m, K=k, N=n, bf16_ms=times.pop("bf16"), ms=times, alias=aliases,
                errors=errors, default=default.key(), rule=rule.key())


class _MaxM:
    """Within the block the GEMV takes up to ``max_m`` rows (``gemv.DEFAULT_GEMV``): graphs captured inside keep it."""

    def __init__(self, max_m):
        self.max_m = max_m

    def __enter__(self):
        from fourbit.kernels import gemv

        self.saved = gemv.DEFAULT_GEMV
        gemv.DEFAULT_GEMV = replace(gemv.DEFAULT_GEMV, max_m=self.max_m)

    def __exit__(self, *exc):
        from fourbit.kernels import gemv

        gemv.DEFAULT_GEMV = self.saved


def time_few_rows(family, k, n, ms, rounds) -> list[dict]:
    """The int4p2 W4A4 r32 layer (speed mode) at M rows: the GEMV vs act_quant + GEMM, beside bf16."""
    from fourbit.kernels.linear import linear_forward

    count = max(2, min(32, -(-2 * L2_BYTES // (n * k))))  # layers with their own weights (the FP8 operand's bytes)
    layers = [make_layer(k, n, "int4p2", "int4p2", seed=i) for i in range(count)]
    w16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(count)]
    out = []
    for m in ms:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
        graphs = InterleavedGraphs()
        for max_m in (16, 0):
            with _MaxM(max_m):
                graphs.add([lambda la=la, x=x: linear_forward(la, x) for la, x in zip(layers, xs)])
        graphs.add([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, w16)])
        gemv_ms, gemm_ms, bf16_ms = graphs.run(rounds)
        out.append(dict(family=family, M=m, K=k, N=n, gemv_ms=gemv_ms, gemm_ms=gemm_ms, bf16_ms=bf16_ms))
    return out


def time_act_paths(family, m, k, rounds) -> dict:
    """act_quant int4p2 with smoothing and the rank-32 branch (factors cached as a layer caches them) on each path."""
    from fourbit.calibration.targets import padded_in_features
    from fourbit.formats import make_format
    from fourbit.kernels import act_quant as aq
    from fourbit.kernels.reference import smooth_reciprocal

    fmt, base = make_format("int4p2"), aq.DEFAULT_CONFIG
    kp = padded_in_features(k, fmt, fmt)  # K zero-padded as quantize pads it (SANA: 5600 -> 5632)
    smooth = torch.rand(kp, device="cuda") + 0.5
    down = (torch.randn(RANK, kp, device="cuda") / k ** 0.5).to(torch.bfloat16)
    folded = aq.fold_down(down, smooth)
    kw = dict(padded_in=kp, down_folded=folded, smooth_recip=smooth_reciprocal(smooth), down_cat=aq.cat_down(folded))
    paths = {"two": replace(base, lr_mm_rows=0), "single+mm": replace(base, lr_mm_rows=1, lr_mm_stream_max_k=0),
             "single+mm-side": replace(base, lr_mm_rows=1, lr_mm_stream_max_k=1 << 30)}
    xs = inputs(m, k)
    graphs = InterleavedGraphs()
    for cfg in paths.values():
        graphs.add([lambda x=x, c=cfg: aq.act_quant(x, fmt, config=c, **kw) for x in xs])
    times = graphs.run(rounds)
    return dict(family=family, M=m, K=k, mm_available=bool(aq._MM_FP32_OUT[0]),
                **{f"{p}_ms": t for p, t in zip(paths, times)})


# ---- report ---------------------------------------------------------------------------------------------------------
def markdown(gemm_rows, table_rows, gemv_rows, act_rows, rec) -> str:
    out = []
    if gemm_rows:
        out.append("## scaled_gemm (rank-32 epilogue + bias), ms per call (CUDA graphs, interleaved medians)\n")
        body = []
        for r in gemm_rows:
            best = min(r["ms"], key=r["ms"].get)
            d = ms_of(r, r["default"]) or float("nan")
            body.append([r["operands"], r["family"], f"{r['M']}x{r['K']}x{r['N']}", r["bf16_ms"], d, r["default"],
                         r["ms"][best], best, d / r["ms"][best], r["bf16_ms"] / r["ms"][best]])
        out.append(md_table(["operands", "family", "MxKxN", "bf16", "default", "default config", "best", "best config",
                             "best vs default", "best vs bf16"], body))
        fam = []
        for ops, f in dict.fromkeys((r["operands"], r["family"]) for r in gemm_rows):
            sel = [r for r in gemm_rows if (r["operands"], r["family"]) == (ops, f)]
            fam.append([ops, f, len(sel), geomean([r["bf16_ms"] / ms_of(r, r["default"]) for r in sel]),
                        geomean([r["bf16_ms"] / min(r["ms"].values()) for r in sel])])
        out.append("\nGEMM alone vs bf16 F.linear, geometric mean per family:\n")
        out.append(md_table(["operands", "family", "shapes", "default vs bf16", "best vs bf16"], fam))
        out.append("\nRows for fourbit/kernels/gemm_table.py (TABLE):\n\n```python\nTABLE: tuple[Row, ...] = (\n"
                   + "\n".join(row_code(r) for r in table_rows) + "\n)\n```\n")
    if gemv_rows:
        out.append("## Few rows: int4p2 W4A4 r32 layer, GEMV vs act_quant + GEMM (ms)\n")
        out.append(md_table(["family", "MxKxN", "GEMV", "act_quant + GEMM", "bf16", "GEMM / GEMV"],
                            [[r["family"], f"{r['M']}x{r['K']}x{r['N']}", r["gemv_ms"], r["gemm_ms"], r["bf16_ms"],
                              r["gemm_ms"] / r["gemv_ms"]] for r in gemv_rows]))
    if act_rows:
        out.append("\n## act_quant int4p2 + rank-32 down-projection, per path (ms)\n")
        out.append(md_table(["family", "MxK", "two launches", "single + cuBLAS", "single + cuBLAS side stream"],
                            [[r["family"], f"{r['M']}x{r['K']}", r["two_ms"], r["single+mm_ms"],
                              r["single+mm-side_ms"]] for r in act_rows]))
    if rec:
        out.append(f"\nRecommended: {rec}\n")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILY_SHAPES))
    p.add_argument("--what", default="gemm,gemv,act", help="comma list of sweeps: gemm, gemv, act")
    p.add_argument("--operands", default="fp8", help="comma list of GEMM operand kinds: fp8, int8 (W8A8)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved replay rounds per shape")
    p.add_argument("--jobs", type=int, default=min(15, (os.cpu_count() or 2) - 1), help="compile processes")
    p.add_argument("--min-gain", type=float, default=0.03, help="a row where a config beats the rule by this")
    p.add_argument("--budget-s", type=float, default=225, help="no new shape is started after this many seconds")
    p.add_argument("--quick", action="store_true", help="4 shapes, a few candidates (smoke test)")
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_tune.py needs a CUDA GPU", file=sys.stderr)
        return 1
    from fourbit.calibration.targets import padded_in_features
    from fourbit.formats import make_format
    from fourbit.kernels import gemm as gm
    from fourbit.kernels._common import device_class

    t0 = time.time()
    log = lambda s: print(f"[{time.time() - t0:5.0f}s] {s}", flush=True)  # noqa: E731
    env, what = environment(), set(args.what.split(","))
    meta = run_meta(env)
    sms, device = gm.num_sms(torch.device("cuda")), device_class(torch.device("cuda"))
    fams = args.families.split(",")
    shapes = [(f, s) for f in fams for s in FAMILY_SHAPES[f] + FAMILY_FEW_ROWS[f]]
    few = [(f, s) for f in fams for s in FAMILY_FEW_ROWS[f]]
    if args.quick:
        shapes, few = shapes[:2] + shapes[-2:], few[:1]
    operands = args.operands.split(",")
    int4p2 = make_format("int4p2")
    gemm_shapes = [(f, (m, padded_in_features(k, int4p2, int4p2), n)) for f, (m, k, n) in shapes]  # the K it sees
    plans = {(ops, f, (m, k, n)): shape_configs(m, n, k, sms, device, quick=args.quick, dtype=OPERANDS[ops])
             for ops in operands for f, (m, k, n) in gemm_shapes} if "gemm" in what else {}
    groups = compile_groups(plans)
    log(f"{env['device']}, {sms} SMs ({device}); {len(plans)} GEMM shapes, {sum(len(g) for g in groups)} "
        f"timings of {len(groups)} kernels; compiling in {min(args.jobs, len(groups))} processes")
    compile_s = compile_all(groups, args.jobs, log) if groups else 0.0
    gemm_rows, gemv_rows, act_rows, skipped = [], [], [], []
    for (ops, fam, (m, k, n)), (configs, aliases) in plans.items():
        if time.time() - t0 > args.budget_s:
            skipped.append([f"gemm {ops}", fam, m, k, n])
            continue
        r = time_gemm_shape(ops, fam, m, n, k, configs, aliases, args.rounds, sms, device)
        gemm_rows.append(r)
        best = min(r["ms"], key=r["ms"].get)
        default_ms = ms_of(r, r["default"]) or float("nan")
        log(f"gemm {ops} {fam} {m}x{k}x{n}: bf16 {r['bf16_ms']:.4f}, default {default_ms:.4f} ms, "
            f"best {r['ms'][best]:.4f} ({best}); {len(r['errors'])} left out")
    if "gemv" in what:
        for fam, (m, k, n) in few:
            if time.time() - t0 > args.budget_s:
                skipped.append(["gemv", fam, m, k, n])
                continue
            gemv_rows += time_few_rows(fam, k, n, (1, 2, 4), args.rounds)
            log(f"gemv {fam} {k}x{n}: " + ", ".join(f"M={r['M']} {r['gemv_ms']:.4f} vs {r['gemm_ms']:.4f}"
                                                    for r in gemv_rows[-3:]))
    if "act" in what:
        seen = set()
        for fam, (m, k, n) in [(f, s) for f, s in shapes if s[0] > 64]:
            if (m, k) in seen:
                continue
            seen.add((m, k))
            if time.time() - t0 > args.budget_s:
                skipped.append(["act", fam, m, k, n])
                continue
            act_rows.append(time_act_paths(fam, m, k, args.rounds))
            r = act_rows[-1]
            log(f"act {fam} {m}x{k}: two {r['two_ms']:.4f}, mm {r['single+mm_ms']:.4f}, "
                f"side {r['single+mm-side_ms']:.4f}")
    run = next_run(os.path.join(args.out, "linear_tune.jsonl"), env["date"])
    table_rows = derive_rows(gemm_rows, device, run, args.min_gain)
    rec = {}
    if gemv_rows:
        rec["GemvConfig.max_m"] = recommend_max_m(gemv_rows)
    if act_rows:
        rec.update({f"ActConfig.{k}": v for k, v in recommend_act(act_rows).items()})
    md = markdown(gemm_rows, table_rows, gemv_rows, act_rows, rec)
    result = dict(sms=sms, device_class=device, rank=RANK, rounds=args.rounds, quick=args.quick,
                  compile_s=compile_s, total_s=time.time() - t0, skipped=skipped, gemm=gemm_rows,
                  table_rows=table_rows, gemv=gemv_rows, act=act_rows, recommended=rec)
    path, run = append_row(args.out, "linear_tune", dict(run=run, variant="shapes", result=result, markdown=md), meta)
    print(md, flush=True)
    log(f"appended run {run} to {path}" + (f"; {len(skipped)} shape(s) skipped (budget)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
