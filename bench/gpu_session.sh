#!/usr/bin/env bash
# The measurements we take on a lent GPU machine, in two parts of < 10 minutes each, on a
# 2-GPU host (part A uses GPU 0 only). Run from the repo root there:
#   bash bench/gpu_session.sh A     # MAE B/L vs naive, DINOv2 L vs naive, MedMNIST eval
#   bash bench/gpu_session.sh B     # loaders, FSDP2 1 -> 2 GPU scaling (MAE L), ViT-g with AC at batch 64
# Wheels that the GPU image lacks (mosaicml-streaming and its codecs) travel in .whl/.
set -u
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
step() {  # step SECONDS CMD...: one measurement; a failure or time-out does not stop the others
  local t=$1; shift
  echo "=== $* (limit ${t}s)"
  timeout "$t" "$@" > "$OUT/log.tmp" 2>&1
  echo "--- exit $?"
  grep -vE "Warning|warn\(|^\s*$" "$OUT/log.tmp" | tail -30
  cat "$OUT/log.tmp" >> "$OUT/session-$PART.log"
}
PART=$1
case $PART in
A)
  export CUDA_VISIBLE_DEVICES=0
  step 290 python3 -m bench train --recipes recipes/vit_b_mae.yaml recipes/vit_l_mae.yaml --batch 512 256 --steps 15 --warmup 5
  step 150 python3 -m bench train --recipes recipes/vit_l_dinov2.yaml --batch 32 --steps 10 --warmup 3
  step 110 python3 -m bench eval --tasks pathmnist bloodmnist breastmnist --max-per-split 20000
  ;;
B)
  step 150 env CUDA_VISIBLE_DEVICES=0 python3 -m bench loaders --backends nvjpeg,cpu,pil --workers 4 --seconds 8 --stall
  step 230 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 128 --variants engine-triton --gpus 1 2 --steps 10 --warmup 3
  step 150 env CUDA_VISIBLE_DEVICES=0 python3 -m bench train --recipes recipes/vit_g_mae.yaml --batch 64 --variants engine-triton --steps 5 --warmup 2
  ;;
esac
tar czf "$OUT/results-$PART.tgz" bench/results
