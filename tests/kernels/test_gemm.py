"""``kernels/gemm``: ``scaled_gemm`` against ``scaled_gemm_torch`` (fp8 / int8 / bf16 operands, row and tensor
scales, the low-rank epilogue, bias, stream-K, ``out=`` rows), and its config and launch helpers.

Exact products, so only the summation order differs: ``SQNR_FP32_REORDER_DB`` in the interpreter,
``SQNR_GPU_ACCUMULATE_DB`` on a GPU (tensor-core accumulation order, tf32 low-rank epilogue).
"""
from __future__ import annotations

import pytest
import torch

from .conftest import bits
from .kernel_helpers import SQNR_BF16_OUTPUT_DB, SQNR_FP32_REORDER_DB, SQNR_GPU_ACCUMULATE_DB, gemm_operands, sqnr_db

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.bfloat16], ids=["fp8", "int8", "bf16"])
def test_scaled_gemm_matches_twin(device, dtype):
    from fourbit.kernels.gemm import GemmConfig, scaled_gemm, scaled_gemm_torch

    m, n, k, r = 40, 72, 128, 20
    a, b = (t.to(device) for t in gemm_operands(dtype, m, n, k))
    cfg = GemmConfig(32, 32, 64 if dtype != torch.bfloat16 else 32, 2, 4, 2, persistent=True)
    cases = [  # (a_scale, b_scale, lowrank, bias)
        (torch.rand(m) + 0.5, torch.rand(n) + 0.5, True, True),
        (torch.rand(1) + 0.5, None, False, False),
        (None, torch.rand(1) + 0.5, True, False),
    ]
    for sa, sb, lowrank, bias in cases:
        lr, up = (torch.randn(m, r), torch.randn(n, r).bfloat16().float()) if lowrank else (None, None)
        bb = torch.randn(n) if bias else None
        sa, sb, lr, up, bb = (t if t is None else t.to(device) for t in (sa, sb, lr, up, bb))
        got = scaled_gemm(a, b, sa, sb, lr, up, bb, out_dtype=torch.float32, config=cfg)
        ref = scaled_gemm_torch(a, b, sa, sb, lr, up, bb, out_dtype=torch.float32)
        assert torch.isfinite(got).all()
        assert sqnr_db(ref, got) > (SQNR_FP32_REORDER_DB if device == "cpu" else SQNR_GPU_ACCUMULATE_DB)


def test_scaled_gemm_branch_of_large_rank_in_chunks(device):
    """A LoRA-grown branch (rank 100, padded to 128: four epilogue dots of BRANCH_CHUNK columns) matches the twin."""
    from fourbit.kernels.gemm import BRANCH_CHUNK, GemmConfig, scaled_gemm, scaled_gemm_torch

    m, n, k, r = 40, 72, 128, 100
    assert r > BRANCH_CHUNK
    a, b = (t.to(device) for t in gemm_operands(torch.float8_e4m3fn, m, n, k))
    lr, up = torch.randn(m, r, device=device), torch.randn(n, r, device=device).bfloat16().float()
    sa, sb = torch.rand(m, device=device) + 0.5, torch.rand(n, device=device) + 0.5
    cfg = GemmConfig(32, 32, 64, 2, 4, 2, persistent=True)
    got = scaled_gemm(a, b, sa, sb, lr, up, out_dtype=torch.float32, config=cfg)
    ref = scaled_gemm_torch(a, b, sa, sb, lr, up, out_dtype=torch.float32)
    assert sqnr_db(ref, got) > (SQNR_FP32_REORDER_DB if device == "cpu" else SQNR_GPU_ACCUMULATE_DB)


@pytest.mark.parametrize("up_dtype", [torch.bfloat16, torch.float16], ids=["bf16-up", "fp16-up"])
@pytest.mark.parametrize("mode", ["rounded", "hi-lo", "16-bit-lr"])
def test_scaled_gemm_16_bit_branch_matches_twin(device, up_dtype, mode):
    """A 16-bit up-projection (a bf16 / fp16 model's own factor): the branch in that type (an fp32 lr rounded once,
    or given in it), or with ``precise`` an fp32 lr as hi + lo (to ~2^-16). The branch dominates y here (tiny
    scales), so each mode is told apart from the others by the bound."""
    from fourbit.kernels.gemm import GemmConfig, scaled_gemm, scaled_gemm_torch

    m, n, k, r = 40, 72, 128, 20
    a, b = (t.to(device) for t in gemm_operands(torch.float8_e4m3fn, m, n, k))
    sa, sb = torch.full((m,), 1e-4, device=device), torch.rand(n, device=device) + 0.5
    lr, up = torch.randn(m, r, device=device), torch.randn(n, r, device=device).to(up_dtype)
    if mode == "16-bit-lr":
        lr = lr.to(up_dtype)
    cfg = GemmConfig(32, 32, 64, 2, 4, 2, persistent=True, precise=mode == "hi-lo")
    got = scaled_gemm(a, b, sa, sb, lr, up, out_dtype=torch.float32, config=cfg)
    ref = scaled_gemm_torch(a, b, sa, sb, lr, up, out_dtype=torch.float32, config=cfg)
    bound = SQNR_FP32_REORDER_DB if device == "cpu" else SQNR_GPU_ACCUMULATE_DB
    assert sqnr_db(ref, got) > bound
    exact = scaled_gemm_torch(a, b, sa, sb, lr.float(), up.float(), out_dtype=torch.float32)  # the fp32 branch
    if mode == "hi-lo":  # the lo part is what reaches the fp32 branch
        assert sqnr_db(exact, got) > bound
    elif mode == "rounded":  # rounded once: the twin's rounding, not the fp32 branch
        assert sqnr_db(exact, got) < bound


def test_scaled_gemm_fp16_branch_clamps_instead_of_overflowing(device):
    """An fp32 lr beyond fp16's range, with an fp16 up: rounded to +-65504 (finite), as the twin does, not inf."""
    from fourbit.kernels.gemm import FP16_MAX, GemmConfig, scaled_gemm, scaled_gemm_torch

    m, n, k, r = 40, 72, 128, 20
    a, b = (t.to(device) for t in gemm_operands(torch.float8_e4m3fn, m, n, k))
    lr = torch.randn(m, r, device=device)
    lr[3, 5], lr[7, 0] = 1e6, -3e5  # past fp16's largest finite value
    up = (torch.randn(n, r, device=device) * 1e-3).half()
    cfg = GemmConfig(32, 32, 64, 2, 4, 2, persistent=True)
    got = scaled_gemm(a, b, None, None, lr, up, out_dtype=torch.float32, config=cfg)
    ref = scaled_gemm_torch(a, b, None, None, lr, up, out_dtype=torch.float32, config=cfg)
    assert torch.isfinite(got).all()
    assert sqnr_db(ref, got) > (SQNR_FP32_REORDER_DB if device == "cpu" else SQNR_GPU_ACCUMULATE_DB)
    clamped = lr.clamp(-FP16_MAX, FP16_MAX)
    assert torch.equal(ref, scaled_gemm_torch(a, b, None, None, clamped, up, out_dtype=torch.float32, config=cfg))


def test_scaled_gemm_non_persistent_and_unaligned_k(device):
    from fourbit.kernels.gemm import GemmConfig, scaled_gemm, scaled_gemm_torch

    a = torch.randint(-127, 128, (33, 200), dtype=torch.int8).to(device)  # K = 200: rows copied to a 16-byte stride
    b = torch.randint(-127, 128, (50, 200), dtype=torch.int8).to(device)
    got = scaled_gemm(a, b, out_dtype=torch.float32, config=GemmConfig(32, 32, 64, 1, 4, 2, persistent=False))
    assert torch.equal(got, scaled_gemm_torch(a, b, out_dtype=torch.float32))


def _scales_branch_bias(m, n):
    """(a_scale, b_scale, lr, up, bias) for an (m, n) output: row/column scales, a rank-20 branch and a bias."""
    return (torch.rand(m) + 0.5, torch.rand(n) + 0.5, torch.randn(m, 20), torch.randn(n, 20).bfloat16().float(),
            torch.randn(n))


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("n,rem", [(80, 3), (112, 1)], ids=["3-tail-tiles", "1-tail-tile"])
@pytest.mark.parametrize("k", [64, 320, 1024], ids=["k-tiles-2", "k-tiles-10", "k-tiles-32"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16], ids=["fp8", "bf16"])
def test_scaled_gemm_stream_k_matches_twin(dtype, k, n, rem):
    """Stream-K tail: 4 programs (the interpreter's SM count) over 3 x (n / 16) tiles of 32 x 16, the last
    ``rem`` shared out by K iterations (a tile whole in one program, or split over 2-4 with the owner adding the
    partials): the twin's result, and the same bits on a second launch."""
    from fourbit.kernels import gemm as gm

    m = 70  # 3 row tiles, the last ragged
    a, b = gemm_operands(dtype, m, n, k)
    cfg = gm.GemmConfig(32, 16, 32, 2, 4, 2, persistent=True, stream_k=True)
    k_tiles = -(-k // 32)
    progs, dp, sk_iters, per = gm.launch_plan(m, n, k, cfg, dtype, 4)
    assert (progs, dp, sk_iters) == (4, 3 * (n // 16) - rem, rem * k_tiles)
    args = _scales_branch_bias(m, n)
    got = gm.scaled_gemm(a, b, *args, out_dtype=torch.float32, config=cfg)
    assert sqnr_db(gm.scaled_gemm_torch(a, b, *args, out_dtype=torch.float32), got) > SQNR_FP32_REORDER_DB
    assert torch.equal(gm.scaled_gemm(a, b, *args, out_dtype=torch.float32, config=cfg), got)  # same bits again


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("n,k,plan", [
    (16, 64, (4, 0, 4, 1)),  # 2 tiles x 2 K tiles: one iteration per program, every tile split in two
    (16, 320, (4, 0, 20, 5)),  # 2 x 10: runs of 5, each tile over 2 programs
    (16, 96, (3, 0, 6, 2)),  # 2 x 3: runs of 2 cross the tile boundary (one program holds a tail and a head)
    (24, 96, (4, 4, 0, 0)),  # 4 tiles, not fewer than the SMs: data-parallel
], ids=["runs-of-1", "runs-of-5", "runs-cross-tiles", "no-split"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.int8], ids=["fp8", "bf16", "int8"])
def test_scaled_gemm_split_k_matches_twin(dtype, n, k, plan):
    """Split-K: a launch of fewer tiles (32 x 16) than the interpreter's 4 SMs deals all K iterations out in runs
    to up to 4 programs (the tile's last run adds the others' partials in order): the twin's result and the same
    bits on a second launch. int8 operands run data-parallel (one program per tile)."""
    from fourbit.kernels import gemm as gm

    m = 40  # 2 row tiles, the last ragged
    a, b = gemm_operands(dtype, m, n, k)
    cfg = gm.GemmConfig(32, 16, 32, 2, 4, 2, persistent=True, split_k=True)
    tiles = 2 * -(-n // 16)
    assert gm.launch_plan(m, n, k, cfg, dtype, 4) == (plan if dtype != torch.int8 else (tiles, tiles, 0, 0))
    args = _scales_branch_bias(m, n)
    got = gm.scaled_gemm(a, b, *args, out_dtype=torch.float32, config=cfg)
    assert sqnr_db(gm.scaled_gemm_torch(a, b, *args, out_dtype=torch.float32), got) > SQNR_FP32_REORDER_DB
    assert torch.equal(gm.scaled_gemm(a, b, *args, out_dtype=torch.float32, config=cfg), got)  # same bits again


def _table_configs():
    """Every config a row of ``gemm_table`` may name (the sweep's candidates and their stream-K / split-K
    variants), one per distinct schedule (the interpreter ignores warps and stages)."""
    from fourbit.kernels import gemm_table as gt

    seen = {}
    for cfg in gt.candidates():
        for c in [cfg] + gt.schedules(cfg):
            seen.setdefault((c.BM, c.BN, c.BK, c.persistent, c.stream_k, c.split_k), c)
    return list(seen.values())


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("cfg", _table_configs(), ids=lambda c: c.key())
def test_every_config_the_table_can_name_matches_twin(cfg):
    """Each config the shape table can name, at a small shape where its schedule takes effect (split-K: 2 tiles on
    the interpreter's 4 SMs; stream-K: 6 tiles, 2 in the tail; else 4), ragged edges, the rank-20 branch and bias:
    the twin's result."""
    from fourbit.kernels import gemm as gm

    rows, cols = (3, 2) if cfg.stream_k else (2, 1) if cfg.split_k else (2, 2)
    m, n, k = (rows - 1) * cfg.BM + 8, cols * cfg.BN - 16, 3 * cfg.BK
    a, b = gemm_operands(torch.float8_e4m3fn, m, n, k)
    plan = gm.launch_plan(m, n, k, cfg, torch.float8_e4m3fn, 4)
    assert (plan[2] > 0) == (cfg.stream_k or cfg.split_k) and (plan[1] == 0) == cfg.split_k
    sa, sb = torch.rand(m) + 0.5, torch.rand(n) + 0.5
    lr, up, bias = torch.randn(m, 20), torch.randn(n, 20).bfloat16().float(), torch.randn(n)
    got = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
    ref = gm.scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    assert sqnr_db(ref, got) > SQNR_FP32_REORDER_DB


@pytest.mark.usefixtures("interpret")
def test_scaled_gemm_writes_into_out_rows():
    from fourbit.kernels.gemm import scaled_gemm, scaled_gemm_torch

    a = torch.randint(-7, 8, (40, 64)).float().to(torch.float8_e4m3fn)
    b = torch.randint(-7, 8, (48, 64)).float().to(torch.float8_e4m3fn)
    sa, sb = torch.rand(40) + 0.5, torch.rand(48) + 0.5
    big = torch.zeros(56, 48, dtype=torch.bfloat16)
    got = scaled_gemm(a, b, sa, sb, out=big[8:48])
    assert got.data_ptr() == big[8:48].data_ptr()
    assert torch.equal(bits(big[8:48]), bits(scaled_gemm(a, b, sa, sb)))  # the interpreter's bf16 cast truncates
    wide = torch.zeros(40, 56)
    scaled_gemm(a, b, sa, sb, out_dtype=torch.float32, out=wide[:, 8:])  # fp32 rows: 224-byte stride, 32-byte offset
    assert torch.allclose(wide[:, 8:], scaled_gemm_torch(a, b, sa, sb, out_dtype=torch.float32), rtol=1e-6)
    assert not big[:8].any() and not big[48:].any()
    with pytest.raises(ValueError, match="out must be"):
        scaled_gemm(a, b, sa, sb, out=big[:39])
    with pytest.raises(ValueError, match="16-byte"):
        scaled_gemm(a, b, sa, sb, out=torch.zeros(40, 49, dtype=torch.bfloat16)[:, :48])


@pytest.mark.usefixtures("interpret")
def test_default_configs_override_and_restore():
    """``default_configs``: the changed default inside the block (both size classes), the previous overrides after
    it, also when the block raises."""
    import dataclasses

    from fourbit.kernels import gemm as gm

    fp8 = torch.float8_e4m3fn
    before = gm.default_config(4608, 3072, 3072, fp8)
    with gm.default_configs(fp8, lambda c: dataclasses.replace(c, precise=True)):
        assert gm.default_config(4608, 3072, 3072, fp8).precise and gm.default_config(8192, 8192, 3072, fp8).precise
        assert not gm.default_config(4608, 3072, 3072, torch.int8).precise
    assert gm.default_config(4608, 3072, 3072, fp8) == before
    with pytest.raises(RuntimeError, match="inside"):
        with gm.default_configs(fp8, lambda c: dataclasses.replace(c, BN=128)):
            raise RuntimeError("inside")
    assert gm.default_config(4608, 3072, 3072, fp8) == before


@pytest.mark.usefixtures("interpret")
def test_gemm_launch_falls_back_to_fewer_stages_when_shared_memory_does_not_fit():
    """A branch grown by a LoRA (rank 32 + 64, padded to 128) needed 256 KiB of shared memory at 3 stages on an H200
    (227 KiB): the launch retries with fewer stages and remembers the depth that fit; other errors pass through."""
    from triton.runtime.errors import OutOfResources

    from fourbit.kernels import gemm

    tried = []

    def launch(stages):
        tried.append(stages)
        if stages > 1:
            raise OutOfResources(262144 if stages == 3 else 245760, 232448, "shared memory")

    key = ("test-cfg", 128, "fp8", True, "cuda:0")
    gemm._FITTING_STAGES.pop(key, None)
    gemm.launch_with_fewer_stages(launch, 3, key)
    assert tried == [3, 2, 1] and gemm._FITTING_STAGES[key] == 1
    tried.clear()
    gemm.launch_with_fewer_stages(launch, 3, key)  # remembered: one launch
    assert tried == [1]

    def never_fits(stages):
        raise OutOfResources(1 << 20, 232448, "shared memory")

    with pytest.raises(OutOfResources):
        gemm.launch_with_fewer_stages(never_fits, 2, ("other",))
    gemm._FITTING_STAGES.pop(key, None)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.bfloat16], ids=["fp8", "int8", "bf16"])
def test_scaled_gemm_gpu(dtype):
    from fourbit.kernels.gemm import scaled_gemm, scaled_gemm_torch

    m, n, k = 1000, 776, 3072
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    else:
        a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(dtype)
        b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(dtype)
    sa, sb = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    lr, up, bias = (torch.randn(m, 32, device="cuda") * 30, torch.randn(n, 32, device="cuda"),
                    torch.randn(n, device="cuda"))
    got = scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    ref = scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    assert sqnr_db(ref, got) > SQNR_GPU_ACCUMULATE_DB


@pytest.mark.gpu
@needs_cuda
def test_scaled_gemm_into_out_rows_gpu():
    """``out=``: the GEMM writes rows of a larger output (TMA store from a view), the same bits as its own output."""
    from fourbit.kernels.gemm import scaled_gemm

    m, n, k = 640, 768, 1024
    a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    lr, up = torch.randn(m, 32, device="cuda"), torch.randn(n, 32, device="cuda")
    big = torch.zeros(m + 256, n, device="cuda", dtype=torch.bfloat16)
    scaled_gemm(a, b, sa, sb, lr, up, out=big[128:128 + m])
    assert torch.equal(bits(big[128:128 + m]), bits(scaled_gemm(a, b, sa, sb, lr, up)))
    assert not big[:128].any() and not big[128 + m:].any()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16], ids=["fp8", "bf16"])
def test_scaled_gemm_stream_k_gpu(dtype):
    """A FLUX-like shape whose last wave is partial (432 tiles of 128 x 256 on 132 SMs, ragged edges): stream-K
    matches the twin and the data-parallel schedule, gives the same bits twice and under CUDA-graph replay."""
    import dataclasses

    from fourbit.kernels import gemm as gm

    m, n, k = 4603, 3032, 3072
    a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(dtype)
    b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(dtype)
    sa, sb = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    lr, up, bias = (torch.randn(m, 32, device="cuda") * 30, torch.randn(n, 32, device="cuda"),
                    torch.randn(n, device="cuda"))
    base = gm.default_config(m, n, k, dtype)
    outs = {}
    for sk in (False, True):
        cfg = dataclasses.replace(base, stream_k=sk)
        outs[sk] = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
        assert torch.equal(gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg), outs[sk])
    ref = gm.scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    assert sqnr_db(ref, outs[True]) > SQNR_GPU_ACCUMULATE_DB
    assert ((outs[True] - outs[False]).norm() / ref.norm()).item() < 1e-5
    cfg = dataclasses.replace(base, stream_k=True)
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on another stream, then two GEMMs in one graph
        gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        y1 = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
        y2 = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y1, outs[True]) and torch.equal(y2, outs[True])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 77, 512])
def test_scaled_gemm_few_tiles_default_gpu(m):
    """Launches with few 128 x 256 tiles (the text stream, the adaLN linears) take the 64 x 128 one-program-per-
    tile config by default; it matches the fp32 twin."""
    from fourbit.kernels import gemm as gm

    n, k = 3072, 3072
    assert gm.default_config(m, n, k, torch.float8_e4m3fn) == gm.FEW_TILES
    a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    lr, up, bias = torch.randn(m, 32, device="cuda"), torch.randn(n, 32, device="cuda"), torch.randn(n, device="cuda")
    got = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    ref = gm.scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    assert sqnr_db(ref, got) > SQNR_GPU_ACCUMULATE_DB



@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m,n,k", [(2, 9216, 1536), (154, 1280, 2048), (666, 1536, 6144)])
def test_scaled_gemm_split_k_gpu(m, n, k):
    """Split-K at conditioning-layer shapes (few tiles of 64 x 128, long K): the twin's result, the same bits on a
    second launch and under CUDA-graph replay."""
    from fourbit.kernels import gemm as gm

    cfg = gm.GemmConfig(64, 128, 128, 8, 4, 4, True, tma_store=True, split_k=True)
    a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    lr, up, bias = torch.randn(m, 32, device="cuda"), torch.randn(n, 32, device="cuda"), torch.randn(n, device="cuda")
    if -(-m // 64) * -(-n // 128) < gm.num_sms(a.device):
        assert gm.launch_plan(m, n, k, cfg, a.dtype, gm.num_sms(a.device))[1] == 0  # no data-parallel tile
    got = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
    ref = gm.scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    assert sqnr_db(ref, got) > SQNR_GPU_ACCUMULATE_DB
    assert torch.equal(gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg), got)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, got)


@pytest.mark.gpu
@needs_cuda
def test_table_configs_gpu():
    """Every config the shape table may name (all warps and stages), compiled, at a shape with ragged edges where
    split-K (64 x * tiles) or the stream-K tail (128 x * tiles) takes effect on 132 SMs: the twin's result, bf16 out."""
    from fourbit.kernels import gemm as gm
    from fourbit.kernels import gemm_table as gt

    m, n, k = 250, 3000, 1536
    a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    lr, up, bias = torch.randn(m, 32, device="cuda"), torch.randn(n, 32, device="cuda"), torch.randn(n, device="cuda")
    ref = gm.scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    for cfg in gt.candidates():
        for c in [cfg] + gt.schedules(cfg):
            got = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, config=c)
            assert sqnr_db(ref, got.float()) > SQNR_BF16_OUTPUT_DB, c.key()
