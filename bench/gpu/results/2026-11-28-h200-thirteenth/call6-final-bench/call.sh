#!/usr/bin/env bash
# thirteenth session: the bench with the peer on the final code
set -uo pipefail
G=.gpu/gpu
NVPIP=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')/nvidia/cu13/lib
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:$NVPIP:${LD_LIBRARY_PATH:-}
CUBLAS=0 bash $G/fast.sh "none" > /dev/null 2>&1
/tmp/ocrp-fast/ocr-patch apply --path .gpu/remote 2>&1 | tail -1
CUBLAS=0 bash $G/fast.sh "bench" 2>&1 | grep -E "^\||rc=" | head -40
