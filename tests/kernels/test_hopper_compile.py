"""The GPU's kernel paths compiled for sm_90 on a machine without a GPU.

A stand-in Triton driver names a Hopper target (compute capability 9.0, the H100's / H200's 227 KiB of shared
memory) and makes loading and launching no-ops, so fourbit's launchers, given CPU tensors, compile every kernel a
quantized layer runs on the GPU with Triton's bundled ptxas: code the interpreter never runs (inline PTX,
libdevice, the GPU's rounding), tensor descriptors, shared memory over the limit (Triton raises before a launch),
configs the CPU tests do not reach. Nothing runs, so outputs are not checked: the GPU tests do that. Skipped where a
GPU is present (its tests compile for real) or Triton has no ptxas.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import fourbit
from fourbit.nn import set_kernel

from .conftest import _KERNEL_MODULES, _set_mode, sass_probe
from .kernel_helpers import PAIRS

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: its own tests compile for it")


def _stand_in_driver():
    """A CudaDriver whose target is sm_90 and whose binaries are never loaded or launched."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return None, None, 32, 0, 1024  # module (None: nothing to unload when the kernel object dies), function,
            # registers, spills, max threads

        def unload_module(self, module):
            pass

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}

    class Launcher:
        def __init__(self, src, metadata):
            pass

        def __call__(self, *args, **kwargs):
            pass

    class StandInHopper(CudaDriver):
        def __init__(self):  # no CUDA library is loaded
            self.utils = Utils()
            self.launcher_cls = Launcher

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    return StandInHopper()


@pytest.fixture
def hopper(monkeypatch):
    """Kernels defined for the compiler, the stand-in driver active, launchers accepting CPU tensors."""
    from triton.runtime.driver import driver

    sass_probe()  # skips where Triton has no bundled ptxas
    _set_mode(False)
    monkeypatch.setattr(driver, "_active", _stand_in_driver())
    for name in _KERNEL_MODULES:
        mod = importlib.import_module(f"fourbit.kernels.{name}")
        if hasattr(mod, "check_device"):
            monkeypatch.setattr(mod, "check_device", lambda *tensors: None)
    yield
    _set_mode(False, force=True)  # fresh kernel objects: none keeps the stand-in's compiled kernels


@pytest.mark.parametrize("kernel", ["triton", "triton-memory"])
@pytest.mark.parametrize("method", ["rtn", "svdquant"])
@pytest.mark.parametrize("wf,af", PAIRS, ids=[f"w{w}-a{a}" for w, a in PAIRS])
def test_layer_kernels_compile_for_hopper(hopper, wf, af, method, kernel):
    """A quantized layer's launches (activation quantization without and with the low-rank branch, the GEMM or
    the weight expansion, the few-row GEMV) compile for sm_90 at a PixArt-like width."""
    lin = nn.Linear(1152, 384).bfloat16()
    xs = [torch.randn(rows, 1152).bfloat16() for rows in (1, 300)]  # the GEMV; act_quant + GEMM
    cfg = (fourbit.SVDQuantConfig(weights=wf, activations=af, rank=32, kernel="reference") if method == "svdquant"
           else fourbit.RTNConfig(weights=wf, activations=af, kernel="reference"))
    model = nn.Sequential(lin)
    fourbit.quantize(model, cfg, forward_loop=lambda m: m(xs[1]), progress=False, verbose=False)
    set_kernel(model, kernel)
    with torch.no_grad():
        for x in xs:
            assert model(x).shape == (x.shape[0], 384)


@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu", "silu"])
def test_gemm_with_output_activation_compiles_for_hopper(hopper, kind):
    """The scaled GEMM with the rank-32 branch, bias and an activation on a column range in its epilogue."""
    from fourbit.kernels.activation import OutputActivation
    from fourbit.kernels.gemm import scaled_gemm

    m, n, k = 512, 768, 1152
    a, b = torch.zeros(m, k, dtype=torch.float8_e4m3fn), torch.zeros(n, k, dtype=torch.float8_e4m3fn)
    y = scaled_gemm(a, b, torch.ones(m), torch.ones(n), torch.zeros(m, 32), torch.zeros(n, 32),
                    torch.zeros(n, dtype=torch.bfloat16), act=OutputActivation(kind, 256))
    assert y.shape == (m, n)


@pytest.mark.parametrize("af", ["int4p2", "fp8"])
def test_cublas_backend_kernels_compile_for_hopper(hopper, monkeypatch, af):
    """The cuBLAS backend's own kernels (act_quant writing the folded columns, ``fold_lr``) compile for sm_90; the
    GEMM itself is torch._scaled_mm (here on the CPU, which takes row-wise scales from torch 2.13)."""
    import fourbit.kernels.linear as linear_mod
    from fourbit.kernels import gemm_cublas
    from fourbit.nn import set_gemm_backend

    if not gemm_cublas.rowwise_scaled_mm(torch.device("cpu")):
        pytest.skip("this torch's CPU _scaled_mm has no row-wise scales")
    lin = nn.Linear(1152, 384).bfloat16()
    x = torch.randn(64, 1152).bfloat16()
    model = nn.Sequential(lin)
    fourbit.quantize(model, fourbit.SVDQuantConfig(weights="int4p2", activations=af, rank=32, kernel="reference"),
                     forward_loop=lambda m: m(x), progress=False, verbose=False)
    set_kernel(model, "triton")
    calls = []
    monkeypatch.setattr(linear_mod, "cublas_gemm", lambda *a, **k: calls.append(1) or gemm_cublas.cublas_gemm(*a, **k))
    set_gemm_backend("cublas", min_rows=0)
    try:
        with torch.no_grad():
            assert model(x).shape == (64, 384)
    finally:
        set_gemm_backend("triton")
    assert len(calls) == (1 if af == "int4p2" else 0)  # fp8 activations with a branch are not folded: Triton's GEMM


@pytest.mark.parametrize("name,out", [("quartz_tok", "fp8"), ("quartz_tok_round", "int8")])
def test_quartz_kernel_compiles_for_hopper(hopper, name, out):
    """QuaRTZ's activation quantization (8-bit codes, leading-zero suppression to 4 bits) compiles for sm_90."""
    from fourbit.formats import make_format
    from fourbit.kernels.quartz_quant import quartz_quant

    got = quartz_quant(torch.randn(300, 1152).bfloat16(), make_format(name), out=out)
    assert got.q.shape[0] == 300
