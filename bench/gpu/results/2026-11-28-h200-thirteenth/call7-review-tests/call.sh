#!/usr/bin/env bash
# thirteenth session, call 7: the GPU tests after the review's mend (sam_fmha_refusal shared by the launcher and the fast path; products required)
set -uo pipefail
G=.gpu/gpu
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee $OUT/gpu.txt
CUBLAS=0 bash $G/fast.sh "tests" 2>&1 | grep -E "result|panicked|FAILED|sam_fmha|sam_rel|failed" | tail -30
