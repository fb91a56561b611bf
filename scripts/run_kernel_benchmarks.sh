#!/usr/bin/env bash
# The kernel checks and benchmarks of issue 4 in one call on a lent GPU machine (no internet):
#   run: bash scripts/run_kernel_benchmarks.sh      (carry .whl-kernels: the diffusers + importlib_metadata wheels)
# Writes logs and results under $OUT (default out/kernels). Each stage has its own time limit, so one slow stage
# does not lose the others. Set STAGES to a subset of "tests linear transformer" to run less.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/kernels}
STAGES=${STAGES:-"tests linear transformer"}
mkdir -p "$OUT"
if ls .whl-kernels/*.whl >/dev/null 2>&1; then
  pip install --no-index --no-deps --target /tmp/site .whl-kernels/*.whl -q 2>&1 | grep -v WARN
fi
export PYTHONPATH=src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
for stage in $STAGES; do
  case $stage in
    tests) timeout 240 python -m pytest -q -x tests/kernels > "$OUT/gpu_tests.log" 2>&1
           echo "gpu tests rc $?"; tail -2 "$OUT/gpu_tests.log" ;;
    linear) timeout 300 python benchmarks/linear.py --out "$OUT" > "$OUT/linear.log" 2>&1
            echo "linear rc $?"; grep -A6 "## Acceptance" "$OUT"/linear.*.md; grep -A3 diagnosis "$OUT/linear.log" ;;
    transformer) timeout 520 python benchmarks/transformer.py --compile --fuse-siblings --profile --out "$OUT" \
                   > "$OUT/transformer.log" 2>&1
                 echo "transformer rc $?"; tail -22 "$OUT/transformer.log" ;;
    *) echo "unknown stage $stage (known: tests linear transformer)"; exit 2 ;;
  esac
done
