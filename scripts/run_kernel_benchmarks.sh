#!/usr/bin/env bash
# GPU checks and benchmarks in one call on a lent GPU machine (no internet):
#   run: STAGES="tests fusion blockwise" bash scripts/run_kernel_benchmarks.sh    (carry .whl: the diffusers wheel)
# Writes logs and result rows under $OUT (default out/kernels). Each stage has its own time limit, so one slow
# stage does not lose the others; a device call is 10 minutes, so pick stages that fit (minutes in brackets).
#   tests [2-7]     the GPU tests (pytest $TESTS_PATHS, default tests/kernels tests/nn tests/pipelines, -k "$TESTS_K",
#                   default "cuda or gpu"; TESTS_K=cublas: ~1), one line each;
#                   $TESTS_WORKERS (default 8) pytest-xdist processes where it imports (the GPU image has it)
#   fusion [1]      probes/fusion_error_probe.py: where the fused fp32 graph's error comes from
#   act [2]         probes/act_chunk_probe.py: act_quant's single pass, chunks / one_load / 2 rows, every family's M, K
#   rowmax [1]      probes/rowmax_probe.py --library-only: act_quant's path "given" vs today's at FLUX.1's large K, and
#                   the producing GEMM's epilogue with / without the row maxima
#   branch [1]      probes/branch_epilogue_probe.py: the GEMM epilogue's up-projection by operand dtype, FLUX.1's shapes
#   blockwise [5]   probes/blockwise_probe.py: cuBLAS block-scaled FP8 GEMM vs bf16 and today's layer, every family
#   linear [5]      linear.py --family $FAMILIES (default SANA-1.6B, SDXL UNet): every family's layer shapes
#   models [9]      models.py --profile, $VARIANTS (default seven, incl. the planned W4A4, its bf16 control and the W4A4/fp8 mix), $MODELS (default SANA-1.6B, SDXL UNet), $BUDGET s
#                   per model
#   calibration [6-9] calibration.py, complete full-size runs: CAL=sd3 (~5 min) or CAL=sdxl (~9 min), one per call
#   transformer [9] transformer.py: the FLUX.1 step
#   quality [3]     kernel_quality.py --variants "$QUALITY_VARIANTS" (default cuBLAS): images vs the reference kernel
#   tune [5]        gemm_tune.py: GEMM tiles / GEMV / act_quant paths at every family's shapes (rows for gemm_table.py)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/kernels}
STAGES=${STAGES:-"tests fusion blockwise"}
MODELS=${MODELS:-"sana-1.6b,sdxl-unet"}
VARIANTS=${VARIANTS:-"bf16,bf16-siblings,fp8-peer,fourbit-w4a4-cublas,fourbit-w4a4-planned,fourbit-fp8,fourbit-mixed-planned"}
BUDGET=${BUDGET:-200}
FAMILIES=${FAMILIES:-"sana-1.6b,sdxl-unet"}
TESTS_K=${TESTS_K:-"cuda or gpu"}
CAL=${CAL:-sd3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 \
    | grep -v WARN
fi
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
for stage in $STAGES; do
  case $stage in
    tests) workers=$(python -c "import xdist" 2>/dev/null && echo "-n ${TESTS_WORKERS:-8}")  # the image has xdist
           timeout ${TESTS_TIMEOUT:-420} python -m pytest $workers -vv -rf --durations=15 -p no:cacheprovider \
             ${TESTS_PATHS:-tests/kernels tests/nn tests/pipelines} -k "$TESTS_K" > "$OUT/gpu_tests.log" 2>&1
           echo "gpu tests rc $?"; grep -E "^FAILED|passed|failed|[0-9.]+s (call|setup)" "$OUT/gpu_tests.log" | tail -30 ;;
    fusion) timeout 90 python benchmarks/probes/fusion_error_probe.py 2>&1 | grep -v Warning | tail -5 ;;
    act) timeout 200 python benchmarks/probes/act_chunk_probe.py --out "$OUT" > "$OUT/act_chunk.log" 2>&1
         echo "act rc $?"; grep "^|" "$OUT/act_chunk.log" | tail -16 ;;
    rowmax) timeout 200 python benchmarks/probes/rowmax_probe.py --library-only --out "$OUT" > "$OUT/rowmax.log" 2>&1
            echo "rowmax rc $?"; grep -E "^\|" "$OUT/rowmax.log" | tail -24 ;;
    branch) timeout 200 python benchmarks/probes/branch_epilogue_probe.py --out "$OUT" > "$OUT/branch.log" 2>&1
            echo "branch rc $?"; grep -E "^\|" "$OUT/branch.log" | tail -26; grep "^Sum" "$OUT/branch.log" ;;
    blockwise) timeout 330 python benchmarks/probes/blockwise_probe.py --out "$OUT" > "$OUT/blockwise.log" 2>&1
               echo "blockwise rc $?"; grep -E "^check|W 1x128|W 128x128|geomean" "$OUT/blockwise.log" | tail -8 ;;
    linear) timeout ${LINEAR_TIMEOUT:-300} python benchmarks/linear.py --family "$FAMILIES" --out "$OUT" \
              > "$OUT/linear.log" 2>&1
            echo "linear rc $?"; tail -5 "$OUT/linear.log" ;;
    models) timeout ${MODELS_TIMEOUT:-540} python benchmarks/models.py --models "$MODELS" --budget "$BUDGET" \
              --variants "$VARIANTS" --profile --out "$OUT" > "$OUT/models.log" 2>&1
            echo "models rc $?"; grep -v "it/s" "$OUT/models.log" | grep -v "profile (ms)\|top kernels" | tail -28 ;;
    calibration) timeout 570 python benchmarks/calibration.py --models "$CAL" --budget "$CAL=540" --calibration-share 0.7 \
                   --out "$OUT" > "$OUT/calibration.log" 2>&1
                 echo "calibration rc $?"; grep -E "^fourbit: |^\{" "$OUT/calibration.log" | cut -c1-400 ;;
    transformer) timeout 520 python benchmarks/transformer.py --compile --fuse-siblings --profile --out "$OUT" \
                   > "$OUT/transformer.log" 2>&1
                 echo "transformer rc $?"; tail -22 "$OUT/transformer.log" ;;
    quality) timeout ${QUALITY_TIMEOUT:-400} python benchmarks/kernel_quality.py --variants "${QUALITY_VARIANTS:-cuBLAS}" --out "$OUT" \
               > "$OUT/kernel_quality.log" 2>&1
             echo "quality rc $?"; grep -E "LPIPS|FAILED" "$OUT/kernel_quality.log" | tail -8 ;;
    tune) timeout 420 python benchmarks/gemm_tune.py --budget-s 300 --out "$OUT" > "$OUT/gemm_tune.log" 2>&1
          echo "tune rc $?"; grep -E "Row\(|max_m|lr_mm" "$OUT/gemm_tune.log" | tail -30 ;;
    *) echo "unknown stage $stage (known: tests fusion act rowmax branch blockwise linear models calibration transformer quality tune)"
       exit 2 ;;
  esac
done
