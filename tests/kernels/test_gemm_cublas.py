"""``kernels/gemm_cublas``: the 'cublas' GEMM backend (``torch._scaled_mm``, the low-rank branch folded into K).

``fold_lr`` is bit-exact against ``fold_lr_torch`` (integer rounding to e4m3 in both); ``cublas_gemm`` against
``cublas_gemm_torch`` (fp32 sums in another order: ``SQNR_FP32_REORDER_DB``; on the GPU the FP8 accumulator:
``SQNR_GPU_ACCUMULATE_DB``); the folded branch against the exact one within ``SQNR_FOLDED_BRANCH_DB``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fourbit

from ..helpers import outlier_layer
from .conftest import bits
from .kernel_helpers import SQNR_FP32_REORDER_DB, SQNR_GPU_ACCUMULATE_DB, db, sqnr_db

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cpu_rowwise():
    from fourbit.kernels.gemm_cublas import rowwise_scaled_mm

    if not rowwise_scaled_mm(torch.device("cpu")):
        pytest.skip("this torch's CPU _scaled_mm has per-tensor scales only (torch 2.11); CI's 2.13 runs this")

#: the branch through FP8 hi + lo parts on both sides (hi = RN(v), lo = RN(v - hi): 2^-8 relative per factor at
#: worst, 2^-10 absolute below e4m3's normal range), in a layer whose branch is as large as its output (the
#: synthetic outlier layer): measured 8.9e-4 relative to the output; bound 2e-3 (bf16's output rounding is 1.7e-3)
SQNR_FOLDED_BRANCH_DB = db(2e-3)  # 54 dB


@pytest.fixture
def cublas_calls(monkeypatch):
    """Counts the layer kernels' calls of ``cublas_gemm`` (which path a layer took)."""
    import fourbit.kernels.linear as linear

    calls = []
    real = linear.cublas_gemm
    monkeypatch.setattr(linear, "cublas_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _lr_rows(m: int, r: int, seed: int = 0):
    """lr (m, r) fp32 with zero, tiny and large rows; a_scale (m,) with a zero entry; lr_mult (r,) powers of two."""
    g = torch.Generator().manual_seed(seed)
    a_scale = torch.rand(m, generator=g) + 0.01
    lr = torch.randn(m, r, generator=g) * a_scale[:, None] * torch.exp(torch.randn(m, 1, generator=g) * 2)
    lr[0] = 0.0
    a_scale[0] = 0.0  # an all-zero row of X: scale 0, branch 0, no NaN
    lr[1] = 1e-6 * a_scale[1]  # subnormal e4m3 values
    lr[2] = 400.0 * a_scale[2]  # near the top of e4m3
    mult = 2.0 ** torch.randint(-3, 2, (r,), generator=g).float()
    lr[2] /= mult.clamp(min=1.0)
    return lr, a_scale, mult


def test_fold_lr_bit_exact(device):
    from fourbit.kernels.gemm_cublas import FOLD_PARTS, fold_lr, fold_lr_torch

    m, r = 70, 32
    lr, a_scale, mult = _lr_rows(m, r)
    lr, a_scale, mult = lr.to(device), a_scale.to(device), mult.to(device)
    buf = torch.zeros((m, 48 + FOLD_PARTS * r), dtype=torch.float8_e4m3fn, device=device)
    got = fold_lr(lr, a_scale, mult, buf[:, 48:])
    ref = fold_lr_torch(lr, a_scale, mult, torch.empty_like(buf[:, 48:]))
    assert torch.equal(bits(got), bits(ref))
    assert torch.equal(bits(buf[:, :48]), torch.zeros_like(bits(buf[:, :48])))  # the operand's columns untouched
    hi, lo = ref[:, :r].float(), ref[:, r:2 * r].float()
    v = torch.where(a_scale[:, None] > 0, lr / torch.where(a_scale > 0, a_scale, 1.0)[:, None], 0.0) * mult
    assert torch.equal(bits(ref[:, 2 * r:]), bits(ref[:, :r]))  # [hi | lo | hi]
    assert ((hi + lo - v).abs() <= torch.maximum(v.abs() * 2.0 ** -8, torch.full_like(v, 2.0 ** -10))).all()
    assert not torch.isnan(ref.float()).any()


def test_fold_weight_range_and_zero_scales():
    from fourbit.kernels.gemm_cublas import fold_weight, lr_bound_mult

    n, kp, r = 32, 64, 16
    w = torch.randint(-7, 8, (n, kp)).float().to(torch.float8_e4m3fn)
    cs = torch.rand(n) + 0.5
    cs[3] = 0.0  # an all-zero weight row: its column scale becomes 1 so that the branch survives
    w[3] = 0
    up = torch.randn(n, r) * 0.1
    l1 = torch.rand(r) * 10
    f = fold_weight(w, cs, up, l1, 7.0)
    assert f is not None and f.w_ext.shape == (n, kp + 3 * r) and f.col_scale[3] == 1.0
    assert torch.equal(bits(f.w_ext[:, :kp]), bits(w))
    assert torch.equal(f.lr_mult, lr_bound_mult(l1, 7.0))
    assert (7.0 * l1 * 1.01 * f.lr_mult <= 448.0).all() and (7.0 * l1 * 1.01 * f.lr_mult * 2 > 448.0).all()
    assert fold_weight(w, cs, up * 1e6, l1, 7.0) is None  # U' beyond e4m3: not folded
    plain = fold_weight(w, cs, None, None, 7.0)
    assert plain.lr_mult is None and plain.w_ext.shape == (n, kp)


def test_cublas_gemm_matches_twin():
    """torch._scaled_mm (CPU here) against the fp32 twin, with the bias rounded to the output type in both."""
    _cpu_rowwise()
    from fourbit.kernels.gemm_cublas import FoldedWeight, cublas_gemm, cublas_gemm_torch

    g = torch.Generator().manual_seed(1)
    m, n, k = 40, 48, 96
    a = torch.randint(-8, 8, (m, k), generator=g).float().to(torch.float8_e4m3fn)
    b = torch.randint(-8, 8, (n, k), generator=g).float().to(torch.float8_e4m3fn)
    w = FoldedWeight(b, torch.rand(n, generator=g) + 0.5, None)
    sa, bias = torch.rand(m, generator=g) + 0.5, torch.randn(n, generator=g)
    got = cublas_gemm(a, w, sa, bias, torch.float32)
    assert sqnr_db(cublas_gemm_torch(a, w, sa, bias, torch.float32), got) > SQNR_FP32_REORDER_DB
    got = cublas_gemm(a, w, sa, bias, torch.bfloat16).float()  # one rounding each, at most one bf16 step apart
    ref = cublas_gemm_torch(a, w, sa, bias, torch.bfloat16).float()
    assert ((got - ref).abs() <= ref.abs() * 2.0 ** -7).all()


def _svdquant_layer(m=512, k=768, n=768, af="int4p2", wf="int4p2", rank=32, dtype=torch.float32):
    x, w = outlier_layer(m=m, k=k, n=n)
    lin = nn.Linear(k, n)
    lin.weight.data = w
    model = nn.Sequential(lin).to(dtype)
    cfg = fourbit.SVDQuantConfig(weights=wf, activations=af, rank=rank, alpha=0.5, kernel="reference")
    fourbit.quantize(model, cfg, forward_loop=lambda mm: mm(x.to(dtype)), progress=False, verbose=False)
    return model, x.to(dtype)


def test_folded_branch_error_twins():
    """The whole fold in plain torch (twins) against the exact branch, on a layer whose branch is large."""
    import torch.nn.functional as F

    from fourbit.kernels.act_quant import act_quant_torch, act_spec
    from fourbit.kernels.gemm import scaled_gemm_torch
    from fourbit.kernels.gemm_cublas import FOLD_PARTS, cublas_gemm_torch, fold_lr_torch, fold_weight
    from fourbit.kernels.linear import layer_state
    from fourbit.kernels.weights import expand_weight_torch

    model, x = _svdquant_layer()
    layer = model[0]
    st = layer_state(layer)
    wo = expand_weight_torch(layer.weight_packed, layer.weight_scales, layer.weight_row_scale, layer.weight_format,
                             layer.padded_in)
    a = act_quant_torch(x, layer.act_format, smooth=layer.smooth.float(), lr_down=layer.lr_down,
                        padded_in=layer.padded_in)
    exact = scaled_gemm_torch(a.q, wo.w, a.row_scale, wo.col_scale, a.lr, st.up, st.bias, out_dtype=torch.float32)
    no_branch = scaled_gemm_torch(a.q, wo.w, a.row_scale, wo.col_scale, None, None, st.bias, out_dtype=torch.float32)
    rp, kp = st.up.shape[1], layer.padded_in
    l1 = F.pad(layer.lr_down.float().abs().sum(1), (0, rp - layer.lr_down.shape[0]))
    folded = fold_weight(wo.w, wo.col_scale, st.up, l1, act_spec(layer.act_format).qmax)
    q = torch.empty((x.shape[0], kp + FOLD_PARTS * rp), dtype=torch.float8_e4m3fn)
    q[:, :kp] = a.q
    fold_lr_torch(a.lr, a.row_scale, folded.lr_mult, q[:, kp:])
    got = cublas_gemm_torch(q, folded, a.row_scale, st.bias, torch.float32)
    assert (exact - no_branch).norm() > 0.3 * exact.norm()  # the branch matters in this layer
    assert sqnr_db(exact, got) > SQNR_FOLDED_BRANCH_DB


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("method", ["svdquant", "rtn"])
def test_layer_cublas_backend(method, cublas_calls):
    """A quantized layer on the 'cublas' backend (interpreter act_quant + fold_lr, CPU torch._scaled_mm) against the
    "triton" backend: the folded branch's error (SVDQuant), fp32 reordering only (RTN: no branch)."""
    _cpu_rowwise()
    from fourbit.kernels.gemm_cublas import set_gemm_backend
    from fourbit.kernels.linear import layer_state
    from fourbit.nn import set_kernel

    if method == "svdquant":
        model, x = _svdquant_layer(m=128, k=256, n=256)
    else:
        x = torch.randn(128, 256)
        model = nn.Sequential(nn.Linear(256, 256))
        cfg = fourbit.RTNConfig(weights="int4p2", activations="int4p2", kernel="reference")
        fourbit.quantize(model, cfg, forward_loop=lambda mm: mm(x), progress=False, verbose=False)
    set_kernel(model, "triton")
    ref = model(x)
    try:
        set_gemm_backend("cublas", min_rows=0)
        layer = model[0]
        layer._cache.clear()
        got = model(x)
        st = layer_state(layer)
        assert st.weight.folded is not None
        assert st.weight.w.data_ptr() == st.weight.folded.w_ext.data_ptr()  # one copy of the operand
        bound = SQNR_FOLDED_BRANCH_DB if method == "svdquant" else SQNR_FP32_REORDER_DB
        assert len(cublas_calls) == 1 and sqnr_db(ref, got) > bound
        again = model(x)
        assert torch.equal(got, again)
        set_gemm_backend("cublas")  # default min_rows (2048): these 128 rows keep the Triton GEMM
        assert torch.equal(bits(model(x)), bits(ref)) and len(cublas_calls) == 2
    finally:
        set_gemm_backend("triton")
    with pytest.raises(ValueError, match="unknown GEMM backend"):
        set_gemm_backend("cutlass")


@pytest.mark.usefixtures("interpret")
def test_compiled_op_takes_the_folded_weight(cublas_calls):
    """``fourbit::quant_linear`` with the folded weight in its list gives the eager 'cublas' layer's bits."""
    _cpu_rowwise()
    from fourbit.kernels.compiled import compiled_forward
    from fourbit.kernels.gemm_cublas import set_gemm_backend
    from fourbit.kernels.linear import layer_state, linear_forward, weight_operand
    from fourbit.nn import set_kernel

    model, x = _svdquant_layer(m=64, k=256, n=256)
    set_kernel(model, "triton")
    layer = model[0]
    try:
        set_gemm_backend("cublas", min_rows=0)
        layer._cache.clear()
        st = layer_state(layer)
        weight_operand(layer, st, memory=False)
        assert st.weight.folded is not None
        eager = linear_forward(layer, x)
        op = compiled_forward(layer, x, memory=False)  # outside dynamo: the op runs its eager implementation
        assert torch.equal(bits(eager), bits(op)) and len(cublas_calls) == 2  # both took the folded path
    finally:
        set_gemm_backend("triton")


@pytest.mark.usefixtures("interpret")
def test_triton_cublas_kernel_takes_cublas_for_its_layer_alone(cublas_calls):
    """The "triton-cublas" kernel: that layer's GEMM on cuBLAS (bit-identical to "triton" under the process-wide
    'cublas' backend), its neighbour on "triton" stays on Triton; ``prepare_kernels`` folds only that layer; the
    compiled op (key "|cublas") gives eager's bits; an unknown backend name is refused."""
    import copy

    import torch._dynamo

    from fourbit.kernels.gemm_cublas import gemm_backend, set_gemm_backend
    from fourbit.kernels.linear import layer_state
    from fourbit.nn import prepare_kernels, set_kernel

    _cpu_rowwise()
    model, x = _svdquant_layer(m=64, k=256, n=256)
    model.append(copy.deepcopy(model[0]))  # a second quantized layer (256 -> 256)
    set_kernel(model, "triton")
    model[0].kernel = "triton-cublas"
    try:
        set_gemm_backend("triton", min_rows=0)  # the process-wide backend stays Triton; cuBLAS from any row count
        prepare_kernels(model)
        assert layer_state(model[0]).weight.folded is not None and layer_state(model[1]).weight.folded is None
        with torch.no_grad():
            first = model[0](x)
            assert len(cublas_calls) == 1
            out = model(x)
            assert len(cublas_calls) == 2  # the first layer only
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            assert torch.equal(bits(compiled(x)), bits(out)) and len(cublas_calls) == 3
            torch._dynamo.reset()
            set_kernel(model, "triton")
            triton_gemm = model[0](x)
            assert len(cublas_calls) == 3
            set_gemm_backend("cublas", min_rows=0)  # the same layer on cuBLAS through the process-wide switch
            assert torch.equal(bits(model[0](x)), bits(first)) and len(cublas_calls) == 4
        assert not torch.equal(bits(first), bits(triton_gemm))  # two GEMMs (and the folded branch), not one path
    finally:
        set_gemm_backend("triton")
    with pytest.raises(ValueError, match="unknown GEMM backend"):
        gemm_backend("cutlass")


@pytest.mark.usefixtures("interpret")
def test_triton_cublas_layers_under_the_fusion_pass(cublas_calls):
    """A FLUX-like block compiled with the fusion pass: a "triton-cublas" layer keeps the activation after it apart
    (cuBLAS has no epilogue for it; the plan timed it so) and runs cuBLAS, the concatenated input (read as two column
    blocks, the folded branch after them) included; a "triton" layer beside them gets its GELU in the epilogue. The
    result is what eager gives with the same kernels."""
    from fourbit.kernels.gemm_cublas import set_gemm_backend
    from fourbit.nn import set_kernel

    from .test_fusion import _compile_with_pass, _eager_and_compiled, _MlpBlock, _quantized_block

    _cpu_rowwise()
    torch.manual_seed(0)
    x = torch.randn(2, 40, 64)
    block = _quantized_block(_MlpBlock(), x)
    set_kernel(block, "triton-cublas")
    try:
        set_gemm_backend("triton", min_rows=0)
        for layer in (block.proj_out, block.fc2):
            layer._cache.clear()
        graphs = []
        eager, got, fused = _eager_and_compiled(block, (x,), lambda m: _compile_with_pass(m, graphs))
        assert fused == (0, 1)  # no activation moved: every layer is on cuBLAS; the concatenation is read in place
        assert len(cublas_calls) == 4 + 4  # eager, then compiled: every layer (Q / MLP-in group, proj_out, fc1, fc2)
        keys = sorted(n.args[7].rsplit("|", 1)[1] for n in graphs[0].nodes if "quant_linear" in str(n.target))
        assert keys == ["cublas"] * 4
        assert sqnr_db(eager, got) > SQNR_FP32_REORDER_DB  # inductor's GELU against eager's: fp32 ulps at most

        block.fc1.kernel = "triton"  # its GELU into Triton's epilogue; the others stay on cuBLAS
        cublas_calls.clear()
        graphs.clear()
        eager, got, fused = _eager_and_compiled(block, (x,), lambda m: _compile_with_pass(m, graphs))
        assert fused == (1, 1) and len(cublas_calls) == 3 + 3
        acts = sorted((n.args[7].rsplit("|", 1)[1], n.args[9]) for n in graphs[0].nodes
                      if "quant_linear" in str(n.target))
        assert acts == [("cublas", ""), ("cublas", ""), ("cublas", ""), ("speed", "gelu")]
        # the epilogue GELU and eager's differ by fp32 ulps (test_fusion: within SQNR_FUSED_FP32_DB); fc2 after it
        # folds its branch into e4m3 hi + lo parts, whose rounding turns such ulps into rare steps of ~2^-9 of a
        # branch entry (measured 1.3e-6 relative): fp32 sums in another order, at most
        assert sqnr_db(eager, got) > SQNR_FP32_REORDER_DB
    finally:
        set_gemm_backend("triton")


@pytest.mark.gpu
@needs_cuda
def test_fold_lr_and_cublas_gemm_gpu():
    """On the GPU: fold_lr bit-exact, cublas_gemm (cuBLAS / CUTLASS FP8) against its twin."""
    from fourbit.kernels.gemm_cublas import FoldedWeight, cublas_gemm, cublas_gemm_torch, fold_lr, fold_lr_torch

    lr, a_scale, mult = (t.cuda() for t in _lr_rows(4096, 32))
    got = fold_lr(lr, a_scale, mult, torch.empty((4096, 96), dtype=torch.float8_e4m3fn, device="cuda"))
    ref = fold_lr_torch(lr, a_scale, mult, torch.empty_like(got))
    assert torch.equal(bits(got), bits(ref))
    m, n, k = 1000, 784, 3072 + 96
    a = torch.randint(-8, 8, (m, k), device="cuda").float().to(torch.float8_e4m3fn)
    b = torch.randint(-8, 8, (n, k), device="cuda").float().to(torch.float8_e4m3fn)
    w = FoldedWeight(b, torch.rand(n, device="cuda") + 0.5, None)
    sa, bias = torch.rand(m, device="cuda") + 0.5, torch.randn(n, device="cuda")
    got = cublas_gemm(a, w, sa, bias, torch.float32)
    assert sqnr_db(cublas_gemm_torch(a, w, sa, bias, torch.float32), got) > SQNR_GPU_ACCUMULATE_DB


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [8192, 600])
def test_layer_cublas_backend_gpu(m, cublas_calls):
    """A bf16 SVDQuant layer on the GPU, 'cublas' against 'triton' (both round the output to bf16 once)."""
    from fourbit.kernels.gemm_cublas import set_gemm_backend
    from fourbit.nn import set_kernel

    model, x = _svdquant_layer(m=m, k=1152, n=3456, dtype=torch.bfloat16)
    model, x = model.cuda(), x.cuda()
    set_kernel(model, "triton")
    ref = model(x).float()
    try:
        set_gemm_backend("cublas", min_rows=0)
        model[0]._cache.clear()
        got = model(x).float()
        folded = model[0]._cache["fourbit.kernels.linear"].weight.folded
        assert folded is not None and folded.bias16 is model[0].bias  # the bias is read in bf16, not cast per call
    finally:
        set_gemm_backend("triton")
    assert len(cublas_calls) == 1  # the cuBLAS path ran
    assert sqnr_db(ref, got) > db(4e-3)  # the two bf16 roundings (1.7e-3 each) and the folded branch (< 2e-3)


def test_plan_times_a_following_activation_as_the_compiled_model_runs_it(interpret, cublas_calls, monkeypatch):
    """plan_precision on a linear followed by a tanh-GELU: the "triton" twin is timed with the GELU in its GEMM
    epilogue (the fusion pass's rewrite), the "triton-cublas" twin on cuBLAS with the GELU after it, the 16-bit one
    with the GELU after it; all three compute the GELU of the layer (within the 4-bit error)."""
    import fourbit.kernels.linear as linear
    from fourbit.kernels.gemm_cublas import set_gemm_backend
    from fourbit.precision_plan import SIXTEEN_BIT

    _cpu_rowwise()
    epilogues = []
    real = linear.scaled_gemm
    monkeypatch.setattr(linear, "scaled_gemm", lambda *a, **k: epilogues.append(k.get("act")) or real(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(approximate="tanh"), nn.Linear(128, 64))
    x = torch.randn(48, 64)
    outputs = {}

    def timer(variants):
        if not outputs:  # the first shape timed: the linear followed by the GELU
            for label, fns in variants.items():
                epilogues.clear()
                cublas_calls.clear()
                xin = fns[0].args[0]
                outputs[label] = (fns[0](), list(epilogues), len(cublas_calls), xin)
        return {label: 1.0 for label in variants}

    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=8, kernel="triton")
    try:
        set_gemm_backend("triton", min_rows=0)
        plan = fourbit.plan_precision(model, cfg, lambda m: m(x), kernels=("triton", "triton-cublas"), timer=timer,
                                      progress=False)
    finally:
        set_gemm_backend("triton")
    assert [lp.activation for lp in plan.layers] == [["gelu_tanh", 0, 128], None]
    bf16, tri, cub = (outputs[k] for k in (SIXTEEN_BIT, "config @ triton", "config @ triton-cublas"))
    assert [str(a) for a in tri[1]] == ["OutputActivation(kind='gelu_tanh', lo=0, hi=128)"] and tri[2] == 0
    assert cub[1] == [] and cub[2] == 1  # cuBLAS, then the GELU apart
    for out, *_ in (bf16, tri, cub):
        assert out.shape == (48, 128) and (out >= -0.2).all()  # GELU's minimum is -0.17
    # each twin is quantized on its own random calibration rows: 4-bit errors (measured 17 dB), not the same codes
    assert sqnr_db(bf16[0], tri[0]) > 12 and sqnr_db(bf16[0], cub[0]) > 12


def test_forward_with_activation_refuses_a_kernel_without_the_epilogue():
    from fourbit.kernels.activation import OutputActivation
    from fourbit.kernels.compiled import forward_with_activation

    layer = _svdquant_layer(m=8, k=64, n=64)[0][0]
    layer.kernel = "triton-cublas"
    with pytest.raises(ValueError, match="runs a layer on one of the kernels"):
        forward_with_activation(layer, torch.randn(8, 64), OutputActivation("gelu"))
