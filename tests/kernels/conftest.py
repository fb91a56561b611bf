"""Fixtures for the kernel tests (one test file per module of ``fourbit/kernels/``).

``device``: a test that takes it runs on "cpu" (fourbit's Triton kernels in Triton's CPU interpreter) and, when a
GPU is present, again on "cuda" (compiled kernels): the same body in both modes.
``interpret``: the CPU interpreter only, for checks whose point is the interpreter (its bf16 truncation, its SM
count) or a CPU fallback. GPU-only checks (large shapes, CUDA graphs, inductor) are ``@pytest.mark.gpu`` tests in
the op's file.

Triton decides interpreter-or-compiler when a kernel is *defined*, so switching modes sets TRITON_INTERPRET and
re-executes fourbit's kernel modules (only when the mode changes); after each test module the mode the session
started in is restored, so other test modules see the kernels as imported.
The checklist of kernel entry points and their twin tests is ``TWINS`` in ``test_twins.py``.
"""
from __future__ import annotations

import functools
import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

# definition order: helpers first, then the modules that import them
_KERNEL_MODULES = ("_common", "activation", "row_amax", "gemm", "gemm_grouped", "act_spec", "act_tiles", "act_single",
                   "act_two", "act_lowrank", "act_given", "act_quant", "weights", "gemv", "quartz_quant", "gemm_cublas", "linear")

_STARTED_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MODE = {"interpret": _STARTED_INTERPRETING}  # what the kernel modules were last defined under


def _set_mode(interpret: bool, force: bool = False) -> None:
    """Define fourbit's kernels for the interpreter (True) or the compiler (False), if they are not already (or
    again, ``force``: fresh kernel objects, with empty compiled-kernel caches)."""
    if _MODE["interpret"] == interpret and not force:
        return
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    for name in _KERNEL_MODULES:
        importlib.reload(importlib.import_module(f"fourbit.kernels.{name}"))
    _MODE["interpret"] = interpret


@pytest.fixture(scope="module", autouse=True)
def _restore_kernel_mode():
    yield
    _set_mode(_STARTED_INTERPRETING)


@pytest.fixture(autouse=True)
def _gpu_tests_compiled(request):
    """``@pytest.mark.gpu`` tests run compiled kernels, also after a "cpu" test of the same module."""
    if request.node.get_closest_marker("gpu") is not None and has_cuda():
        _set_mode(False)


_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def count(out_ptr, n):
    acc = 0
    for i in range(0, n, 1):  # a loop over a runtime bound, as every fourbit kernel has
        acc += 1
    tl.store(out_ptr, acc)

out = torch.zeros(1, dtype=torch.int32)
count[(1,)](out, 3)
assert out.item() == 3
"""


@functools.cache
def _interpreter_works() -> str:
    """'' if Triton's interpreter runs a loop with a runtime bound here, else why not. (Triton 3.6's
    interpreter converts loop bounds with int() of a 1-element array, which NumPy 2.4 refuses.)"""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
    return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1][:200]


def _use_interpreter() -> None:
    broken = _interpreter_works()
    if broken:
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run fourbit's kernels with this NumPy "
                    f"({broken}); the CI machines' Triton runs them")
    _set_mode(True)


def has_cuda() -> bool:
    return torch.cuda.is_available()


DEVICES = ["cpu"] + (["cuda"] if has_cuda() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """"cpu" (the interpreter) always; "cuda" (compiled kernels) when a GPU is present."""
    if request.param == "cpu":
        _use_interpreter()
    else:
        _set_mode(False)
    return request.param


@pytest.fixture
def interpret():
    """The kernels in Triton's CPU interpreter."""
    _use_interpreter()


@pytest.fixture
def compiled():
    """The kernels defined for Triton's compiler (what a GPU runs), on any machine: for tests that compile them for a
    GPU target without launching (``probes/act_sass_probe.py``)."""
    _set_mode(False)


def sass_probe():
    """benchmarks/probes/act_sass_probe.py (compiles kernels for sm_90 and reads their SASS without a GPU), or a skip
    where this Triton has no bundled ptxas / nvdisasm / cuobjdump."""
    import importlib.util
    import pathlib

    import triton

    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not all((bin_dir / tool).exists() for tool in ("ptxas", "nvdisasm", "cuobjdump")):
        pytest.skip("this Triton has no bundled ptxas / nvdisasm / cuobjdump")
    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "probes" / "act_sass_probe.py"
    spec = importlib.util.spec_from_file_location("act_sass_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


def compile_for_hopper(fn, signature: dict, constexprs: dict, num_warps: int = 4):
    """``fn`` (a @triton.jit kernel) compiled for sm_90 without a GPU, or a skip."""
    return sass_probe().compile_for_target(fn, signature, constexprs, 90, num_warps)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of t (for bit-for-bit comparisons that also tell -0 from +0)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(view)
