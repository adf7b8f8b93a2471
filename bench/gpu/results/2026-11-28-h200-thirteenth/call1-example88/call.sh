#!/usr/bin/env bash
# thirteenth session, call 1: CUTLASS example 88's Hopper FMHA (head dim 64, bf16, no bias) on SAM's attention shapes
set -uo pipefail
G=.gpu/gpu
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee $OUT/gpu.txt
chmod +x $G/fwd64
for args in "--b=1 --h=12 --q=4096 --k=4096" "--b=6 --h=12 --q=1600 --k=1600" "--b=6 --h=12 --q=1600 --k=1600 --mask=residual" "--b=1 --h=16 --q=257 --k=257 --mask=residual" "--b=7 --h=16 --q=101 --k=101 --mask=residual"; do
  echo "== $args"
  $G/fwd64 $args --d=64 --iterations=200 --verify 2>&1 | tee -a $OUT/fmha.txt
done
