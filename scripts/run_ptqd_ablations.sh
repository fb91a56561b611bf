export PYTHONPATH=src FOURBIT_FASHION_MNIST=.data-test/fashion-mnist PYTHONUNBUFFERED=1 FOURBIT_PROGRESS=0
R=/tmp/ptqd; mkdir -p $R; START=$(date +%s)
left() { echo $(( 560 - ($(date +%s) - START) )); }
run() { n=$1; shift; t=$(left); [ $t -lt 30 ] && { echo "skip $n"; return; }; timeout $t python3 -m fourbit ptqd-ablation "$@" --samples 256 --steps 50 --eta 0,1 --stats-samples 256 --calib-samples 64 --batch-size 256 --device cuda --n-boot 300 --fd-n-boot 20 --data-samples 1000 --out $R/$n > $R/$n.log 2>&1; echo "$n rc=$? $(( $(date +%s) - START ))s"; tar czf $OUT/ptqd.tgz -C $R .; }
run dit-svdquant-w4a4 --model fashion-dit --variant svdquant:w4a4:r32 --mixed 4-8
run dit-rtn-w4a4 --model fashion-dit --variant rtn:w4a4 --mixed 4-8
run unet-svdquant-w4a4 --model fashion-unet --variant svdquant:w4a4:r32 --mixed ''
run unet-rtn-w4a4 --model fashion-unet --variant rtn:w4a4 --mixed ''
run dit-svdquant-w4a8 --model fashion-dit --variant svdquant:w4a8:r32 --mixed ''
cat $R/dit-svdquant-w4a4/ablation.md 2>/dev/null | head -40
