#!/usr/bin/env bash
# First GPU measurements, run on the device machine from the repository root (see
# docs/benchmarks.md, "First GPU measurements"). Expects, in the ignored folder .gpu/:
#   bin.tar.gz   gpu_bench + ocr-patch-synth built with `--features cuda` (examples/gpu_bench.rs)
#   config.json  the Hub's config.json
#   remote/      the remote code's .py files + config.json, patched by `ocr-patch apply --path`
# and in .whl/ the wheels the remote code needs beyond the image (addict, easydict). Here:
#   eval "$(../shared/tools/cuda-build-env.sh)"
#   cargo build --release --features cuda --target-dir /work/target-cuda \
#     --bin ocr-patch-synth --example gpu_bench
#   tar -czf .gpu/bin.tar.gz -C /work/target-cuda/release ocr-patch-synth -C examples gpu_bench
#   mkdir -p .gpu/remote && cp <hub .py files> ../shared/data/deepseek-ocr/config.json .gpu/remote/
#   ocr-patch apply --path .gpu/remote; cp ../shared/data/deepseek-ocr/config.json .gpu/
# then on the device: `bash bench/gpu/run.sh` with carry [".gpu", ".whl"] (~2 min on an H100).
# Writes JSON and logs to $WORK/res, packed into $OUT/results.tar.gz after each run (the device
# tool brings back at most 8 files); the logits stay in $WORK.
# Usage: [DIAG=1] bench/gpu/run.sh [DTYPES (default "bf16 f32")] [ENGINES (default "rust tf")]
# DIAG=1 also runs bench/gpu/tf_diag.py (transformers' bf16 load against its f32 load).
set -uo pipefail
OUT=${OUT:-/tmp/ocrp-out}
WORK=${WORK:-/tmp/ocrp-gpu}
DTYPES=${1:-bf16 f32}
ENGINES=${2:-rust tf}
RES="$WORK/res"
mkdir -p "$OUT" "$WORK/w" "$RES"
pack() { tar -czf "$OUT/results.tar.gz" -C "$WORK" res; }
NVPIP=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia/cu13/lib
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:$NVPIP:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$RES/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
tar -xzf .gpu/bin.tar.gz -C "$WORK"
cp .gpu/config.json "$WORK/w/config.json"
if [ ! -s "$WORK/w/model.safetensors" ]; then
  ( time "$WORK/ocr-patch-synth" --config "$WORK/w/config.json" --seed 1 \
    -o "$WORK/w/model.safetensors" --dtype bf16 ) 2>&1 | tee "$RES/synth.log"
fi
for dt in $DTYPES; do
  for e in $ENGINES; do
    echo "== $e $dt"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$WORK/smi-$e-$dt.txt" &
    smi=$!
    if [ "$e" = rust ]; then
      timeout 150 "$WORK/gpu_bench" --model-dir "$WORK/w" --dtype "$dt" \
        --json "$RES/rust-$dt.json" --logits "$WORK/rust-$dt.safetensors" > "$RES/rust-$dt.log" 2>&1
    else
      timeout 200 python3 bench/gpu/tf_peer.py run --model-dir "$WORK/w" --remote-code .gpu/remote \
        --dtype "$dt" --json "$RES/tf-$dt.json" --logits "$WORK/tf-$dt.safetensors" > "$RES/tf-$dt.log" 2>&1
    fi
    echo "rc=$?"
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    echo "nvidia-smi peak MiB: $(sort -n "$WORK/smi-$e-$dt.txt" | tail -1)" | tee -a "$RES/$e-$dt.log"
    tail -c 1500 "$RES/$e-$dt.log"; pack
  done
done
python3 bench/gpu/tf_peer.py compare --dir "$WORK" --json "$RES/compare.json"
pack
if [ "${DIAG:-0}" = 1 ]; then
  echo "== tf_diag (bf16 vs f32 loads of the remote code)"
  timeout 240 python3 bench/gpu/tf_diag.py --model-dir "$WORK/w" --remote-code .gpu/remote \
    --json "$RES/diag.json" > "$RES/diag.log" 2>&1; echo "rc=$?"
  pack
fi
