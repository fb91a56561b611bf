"""The checklist: every entry point of ``fourbit/kernels/`` has a plain-torch twin and a test against it.

``TWINS`` maps each launcher to its twin, the op's test file and the tests there that run both (each test's source
must name every string in ``calls``). The test below finds launchers itself (every ``f`` with an ``f_torch`` beside
it, every ``*_torch`` twin, every module of the package), so a new kernel without a twin test fails it.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

pytest.importorskip("triton")


class Twin(NamedTuple):
    twin: Optional[str]  # "module.function" of the plain-torch twin (None: the twin is the eager model itself)
    file: str
    tests: tuple
    calls: tuple = ()  # names each test's source must contain (default: the launcher's and the twin's)


TWINS = {
    "act_quant.act_quant": Twin("act_quant.act_quant_torch", "test_act_quant.py", (
        "test_act_quant_bit_exact", "test_act_quant_two_column_blocks_bit_exact",
        "test_act_quant_bf16_input_no_smooth_no_rank", "test_act_quant_bit_exact_gpu",
        "test_act_quant_large_m_down_projection_paths_gpu")),
    "weights.expand_weight": Twin("weights.expand_weight_torch", "test_weights.py", (
        "test_expand_weight_bit_exact", "test_expand_weight_group_not_a_power_of_two_bit_exact",
        "test_expand_weight_bit_exact_gpu")),
    "gemm.scaled_gemm": Twin("gemm.scaled_gemm_torch", "test_gemm.py", (
        "test_scaled_gemm_matches_twin", "test_scaled_gemm_non_persistent_and_unaligned_k",
        "test_scaled_gemm_stream_k_matches_twin", "test_scaled_gemm_writes_into_out_rows", "test_scaled_gemm_gpu",
        "test_scaled_gemm_stream_k_gpu", "test_scaled_gemm_few_tiles_default_gpu",
        "test_scaled_gemm_split_k_matches_twin", "test_every_config_the_table_can_name_matches_twin",
        "test_scaled_gemm_split_k_gpu", "test_table_configs_gpu")),
    "gemm_cublas.fold_lr": Twin("gemm_cublas.fold_lr_torch", "test_gemm_cublas.py", (
        "test_fold_lr_bit_exact", "test_fold_lr_and_cublas_gemm_gpu")),
    "gemm_cublas.cublas_gemm": Twin("gemm_cublas.cublas_gemm_torch", "test_gemm_cublas.py", (
        "test_cublas_gemm_matches_twin", "test_fold_lr_and_cublas_gemm_gpu")),
    "gemm_grouped.grouped_gemm": Twin("gemm_grouped.grouped_gemm_torch", "test_gemm_grouped.py", (
        "test_grouped_gemm_matches_twin", "test_grouped_gemm_gpu")),
    "gemv.gemv": Twin("gemv.gemv_torch", "test_gemv.py", ("test_gemv_matches_twin", "test_gemv_gpu")),
    "quartz_quant.quartz_quant": Twin("quartz_quant.quartz_quant_torch", "test_quartz_quant.py", (
        "test_bit_exact_against_the_reference", "test_smoothing_padding_and_low_rank")),
    # the epilogue activation (a @triton.jit helper) runs inside the GEMM: scaled_gemm(act=) vs scaled_gemm_torch(act=)
    "activation.activate": Twin("activation.activation_torch", "test_activation.py", (
        "test_scaled_gemm_output_activation_matches_twin", "test_scaled_gemm_output_activation_gpu"),
        calls=("OutputActivation", "scaled_gemm_torch")),
    # the row maxima for the next layer (a @triton.jit helper) run inside the GEMM's epilogue: bit for bit those of
    # the kernel's own output, and the twin's to its rounding
    "row_amax.tile_row_amax": Twin("row_amax.row_amax_torch", "test_row_amax.py", (
        "test_scaled_gemm_row_amax_matches_twin", "test_scaled_gemm_row_amax_gpu"),
        calls=("RowAmax", "scaled_gemm_torch")),
    # the low-rank up-projection (a @triton.jit helper) runs inside both GEMMs' epilogues: fp32 (TF32) and 16-bit up,
    # lr rounded once or as hi + lo, each against the twins' ``branch_torch``
    "gemm.add_branch": Twin("gemm.branch_torch", "test_gemm.py", (
        "test_scaled_gemm_matches_twin", "test_scaled_gemm_16_bit_branch_matches_twin"),
        calls=("scaled_gemm_torch", "lr", "up")),
    # a quantized layer's kernels, selected by name, against the "reference" kernel
    "linear.triton_speed": Twin("reference.quant_linear_reference", "test_linear.py", (
        "test_layer_fp32_matches_reference", "test_layer_bf16_within_output_rounding"),
        calls=("set_kernel", '"triton"')),
    "linear.triton_memory": Twin("reference.quant_linear_reference", "test_linear.py", (
        "test_layer_fp32_matches_reference",), calls=("set_kernel", '"triton-memory"')),
    # "triton" with this layer's GEMM on cuBLAS: against "triton" under the process-wide 'cublas' backend (which
    # test_layer_cublas_backend checks against the "triton" GEMM within the folded branch's error)
    "linear.triton_cublas": Twin("linear.linear_forward", "test_gemm_cublas.py", (
        "test_triton_cublas_kernel_takes_cublas_for_its_layer_alone",), calls=('"triton-cublas"', "set_gemm_backend")),
    # the custom op torch.compile sees, against the eager layer
    "compiled.quant_linear": Twin("linear.linear_forward_uncompiled", "test_compiled.py", (
        "test_compiled_model_runs_layers_as_custom_ops",
        "test_loaded_checkpoint_with_siblings_compiles_without_graph_breaks",
        "test_prepare_kernels_skips_operands_of_single_row_layers", "test_compiled_layers_gpu"),
        calls=("torch.compile", "eager")),
    # the inline lowering: the quantization in torch ops, the GEMM alone as an op, the lowered layer
    "act_inline.act_quant_inline": Twin("act_quant.act_quant_torch", "test_act_inline.py", (
        "test_act_quant_inline_bit_exact", "test_act_quant_inline_gpu")),
    "compiled.scaled_gemm_op": Twin("gemm.scaled_gemm_torch", "test_act_inline.py", (
        "test_scaled_gemm_op_matches_twin",), calls=("fourbit.scaled_gemm", "scaled_gemm_torch")),
    "compiled.quant_linear_inline": Twin("linear.linear_forward_uncompiled", "test_act_inline.py", (
        "test_inline_block_compiled_matches_eager",), calls=("torch.compile", "eager")),
    # a graph pass, not a kernel: its twin is the unfused eager model
    "fusion.FuseAroundQuantLinear": Twin(None, "test_fusion.py", (
        "test_fusion_pass_moves_activations_and_concatenations", "test_fusion_pass_leaves_unsafe_graphs_alone",
        "test_fused_activation_without_epilogue_is_eager_bitwise", "test_fusion_pass_on_diffusers_transformers",
        "test_inductor_options_fuse_under_torch_compile", "test_fusion_under_inductor_gpu"), calls=("eager",)),
}

#: modules with no entry point of their own, and where they are tested
INTERNAL = {
    "_common": "Triton helpers (rounding, e2m1, amax) inside every kernel: tested through them",
    "reference": "the twins of the layer kernels (quant_linear_reference)",
    "gemm_table": "the GEMM's configs by shape (data and lookup): test_gemm_table; its configs in test_gemm",
    "act_spec": "act_quant's format table and operand type (test_act_quant: act_spec, bit-exact operands)",
    "act_tiles": "act_quant's shared tile code: every act_quant test",
    "act_single": "act_quant's single pass: act_path 'single' in test_act_quant",
    "act_two": "act_quant's two launches: act_path 'two' in test_act_quant",
    "act_lowrank": "act_quant's down-projection operand and cuBLAS path: fold_down, single+mm paths in test_act_quant",
    "act_given": "act_quant's path 'given' (row maxima from the producer): test_act_given against act_quant and its twin",
}

HERE = Path(__file__).parent


def _resolve(dotted: str):
    mod, name = dotted.split(".")
    return getattr(importlib.import_module(f"fourbit.kernels.{mod}"), name)


def _kernel_modules() -> list[str]:
    import fourbit.kernels

    return sorted(m.name for m in pkgutil.iter_modules(fourbit.kernels.__path__))


def _test_sources(file: str) -> dict:
    text = (HERE / file).read_text()
    return {n.name: ast.get_source_segment(text, n) for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}


def test_every_kernel_module_is_on_the_checklist():
    modules = set(_kernel_modules())
    covered = {k.split(".")[0] for k in TWINS} | set(INTERNAL)
    assert modules <= covered, f"kernel modules without a twin test on the checklist: {sorted(modules - covered)}"
    assert covered <= modules, f"checklist names modules that do not exist: {sorted(covered - modules)}"


def test_every_launcher_with_a_torch_twin_is_on_the_checklist():
    twins = {t.twin for t in TWINS.values()}
    for mod in _kernel_modules():
        m = importlib.import_module(f"fourbit.kernels.{mod}")
        own = {n for n, v in vars(m).items() if callable(v) and getattr(v, "__module__", None) == m.__name__}
        for name in own:
            if name.endswith("_torch") and not name.startswith("_"):
                assert f"{mod}.{name}" in twins, f"{mod}.{name} is a twin no TWINS entry tests against"
                base = name[: -len("_torch")]
                if base in own:
                    assert f"{mod}.{base}" in TWINS, f"{mod}.{base} has a twin but no entry in TWINS"


@pytest.mark.parametrize("launcher", sorted(TWINS))
def test_each_launcher_has_its_twin_test(launcher):
    entry = TWINS[launcher]
    assert callable(_resolve(launcher))
    if entry.twin is not None:
        assert callable(_resolve(entry.twin))
    tests = _test_sources(entry.file)
    calls = entry.calls or (launcher.split(".")[1], entry.twin.split(".")[1])
    for name in entry.tests:
        assert name in tests, f"{entry.file} has no {name}"
        missing = [c for c in calls if c not in tests[name]]
        assert not missing, f"{entry.file}::{name} does not call {missing}"
