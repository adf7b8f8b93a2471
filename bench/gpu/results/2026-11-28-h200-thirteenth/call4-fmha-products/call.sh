#!/usr/bin/env bash
# thirteenth session, call 4: GPU tests, warm ncu with SAM's global attention by CUTLASS's FMHA (terms from cuBLAS products) and by sam_flash, A/B
set -uo pipefail
G=.gpu/gpu
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee $OUT/gpu.txt
CUBLAS=0 bash $G/fast.sh "tests" 2>&1 | grep -E "result|panicked|FAILED|sam_fmha|sam_rel|failed" | tail -30
for v in 1 0; do
  echo "== warm ncu, OCR_PATCH_SAM_FMHA=$v"
  OCR_PATCH_SAM_FMHA=$v NCU_CACHE=none bash $G/fast.sh "gprofile vprofile" > $OUT/ncu-fmha$v.txt 2>&1
  grep -E "sam_flash|fmha|gemm|Gemm|total|==" $OUT/ncu-fmha$v.txt | head -30
  rm -f $OUT/gprofile.csv $OUT/vprofile.csv
done
echo "== A/B"
AB_KNOB="OCR_PATCH_SAM_FMHA=0" OUT=$OUT/ab bash $G/ab.sh 3 2>&1 | tee $OUT/ab.txt
rm -f $OUT/ab/*.json
