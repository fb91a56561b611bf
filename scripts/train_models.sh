#!/usr/bin/env bash
# Train both bundled models at once on one GPU (two processes sharing it), as done for the shipped weights.
#
#   DATA=/usr/share/datasets/fashion-mnist OUT=runs/train MINUTES=7.5 scripts/train_models.sh
#
# Each process trains for MINUTES (plus ~30 s of start-up, test-set loss and sample grid) and writes
# <model>.safetensors, <model>.losses.json, <model>.samples.png and <model>.log into OUT.
# A 20-step smoke run of each model goes first so that a broken setup fails in seconds, not minutes.
set -euo pipefail
OUT=${OUT:-runs/train}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
MINUTES=${MINUTES:-7.5}
SEED=${SEED:-0}
BATCH=${BATCH:-512}
LR=${LR:-3e-4}
MODELS=${MODELS:-"fashion-dit fashion-unet"}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
mkdir -p "$OUT"

smoke=$(mktemp -d)
for m in $MODELS; do
  $PY -m fourbit.training.train --model "$m" --steps 20 --log-every 10 --batch-size "$BATCH" --out "$smoke" \
    --data "$DATA" --eval-samples 100 --grid-steps 2 --grid-per-class 1
done
rm -rf "$smoke"

pids=()
for m in $MODELS; do
  $PY -m fourbit.training.train --model "$m" --minutes "$MINUTES" --batch-size "$BATCH" --lr "$LR" \
    --seed "$SEED" --out "$OUT" --data "$DATA" > "$OUT/$m.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
tail -n 3 "$OUT"/*.log
exit $status
