#!/usr/bin/env bash
# The PTQD ablations of docs/ptqd.md, on the device machine (H100): 256 samples, DDIM 50, eta 0 and 1,
# statistics from 256 other trajectories, validation of the components on 128 of those seeds.
#   bash scripts/run_ptqd_ablations.sh dit-rtn-w4a4 dit-svdquant-w4a4 ...   (default: all of them)
# Results: $OUT/ptqd.tgz (one folder per ablation with ablation.{json,md} and grids); BUDGET_S caps the wall time.
export PYTHONPATH=src FOURBIT_FASHION_MNIST=${FOURBIT_FASHION_MNIST:-.data-test/fashion-mnist} PYTHONUNBUFFERED=1 FOURBIT_PROGRESS=0
R=/tmp/ptqd; mkdir -p $R "${OUT:=out}"; START=$(date +%s); BUDGET_S=${BUDGET_S:-560}
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
declare -A ARGS=(
  [dit-svdquant-w4a4]="--model fashion-dit --variant svdquant:w4a4:r32 --mixed 4-8"
  [dit-rtn-w4a4]="--model fashion-dit --variant rtn:w4a4 --mixed 4-8"
  [dit-svdquant-w4a8]="--model fashion-dit --variant svdquant:w4a8:r32 --mixed ''"
  [unet-svdquant-w4a4]="--model fashion-unet --variant svdquant:w4a4:r32 --mixed ''"
  [unet-rtn-w4a4]="--model fashion-unet --variant rtn:w4a4 --mixed ''"
  [unet-svdquant-w4a8]="--model fashion-unet --variant svdquant:w4a8:r32 --mixed ''"
  [unet-rtn-w4a8]="--model fashion-unet --variant rtn:w4a8 --mixed ''"
)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=(dit-svdquant-w4a4 dit-rtn-w4a4 dit-svdquant-w4a8 unet-svdquant-w4a4 unet-rtn-w4a4 unet-svdquant-w4a8 unet-rtn-w4a8)
for n in "${names[@]}"; do
  t=$(left); [ "$t" -lt 30 ] && { echo "skip $n (time)"; continue; }
  eval "timeout $t python3 -m fourbit ptqd-ablation ${ARGS[$n]} --samples 256 --steps 50 --eta 0,1 --stats-samples 256 \
    --validate-samples 128 --calib-samples 64 --batch-size 256 --device cuda --n-boot 300 --fd-n-boot 20 \
    --data-samples 1000 --out $R/$n" > $R/$n.log 2>&1
  echo "$n rc=$? $(( $(date +%s) - START ))s"; tail -3 $R/$n.log | grep -i error
  tar czf $OUT/ptqd.tgz -C $R .
done
