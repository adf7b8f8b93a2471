#!/usr/bin/env bash
# GPU summaries + `verify --device cuda` + `ocr --device cuda`, in one device call (docs/fidelity.md,
# golden/gpu/README.md). Run from the repository root on the device with carry [".gpu", ".whl"];
# expects in .gpu/verify/ (ignored; prepared here):
#   bin.tar.gz     ocr-patch + ocr-patch-synth built with `--features cuda`
#   generate.py, gpu_summary.py, verify_run.sh   copies of golden/*.py and this script
#   patched/       the remote code's .py files + config.json, `ocr-patch apply --path patched`
#   original/      the same files unpatched (never committed)
#   whl446/        transformers 4.46.3, tokenizers 0.20.3, huggingface_hub 0.26.5 wheels (cp312)
#   configs/       golden/configs/{mla,group}.json
#   page.png       one page for `ocr`
# Steps run in parallel where they do not depend on each other; results: $OUT/results.tar.gz.
set -uo pipefail
OUT=${OUT:-/tmp/ocrp-out}; W=/tmp/ocrp-v; V=.gpu/verify; R=$W/res
mkdir -p "$W" "$R" "$OUT"
# at most 8 files come back from the device: everything goes into one archive, refreshed often
pack() { local f="$W/pack.$BASHPID.tgz"; tar -czf "$f" -C "$W" res 2>/dev/null && mv "$f" "$OUT/results.tar.gz"; }
trap pack EXIT
NVPIP=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia/cu13/lib
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:$NVPIP:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tf446 $V/whl446/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$R/gpu.txt"
tar -xzf $V/bin.tar.gz -C "$W"
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 ))s] $*"; pack; }
mkdir -p "$W/real" "$W/mla" "$W/group"
"$W/ocr-patch-synth" --config $V/patched/config.json --seed 1 -o "$W/real/model.safetensors" > "$R/synth.log" 2>&1
for c in mla group; do "$W/ocr-patch-synth" --config $V/configs/$c.json --seed 1 -o "$W/$c/model.safetensors" >> "$R/synth.log" 2>&1; done
t synth done
S="python3 $V/gpu_summary.py run"
# A: transformers (device's, 5.17) on the patched code
( export PYTHONPATH=/tmp/site
  for dt in bf16 f32; do timeout 120 $S --remote-code $V/patched --config $V/patched/config.json --config-name real \
      --weights "$W/real/model.safetensors" --dtype $dt --state patched --out "$R/real-base-$dt.safetensors"; t "A real $dt rc=$?"; done
  # (mla is left out: the patched code fails on transformers 5.x with use_mla, KeyError 'type' in
  # _init_rope, docs/fidelity.md; it runs on 4.46.3 below)
  for c in group; do for dt in f32 bf16; do timeout 60 $S --remote-code $V/patched --config $V/configs/$c.json \
      --weights "$W/$c/model.safetensors" --dtype $dt --state patched --out "$R/$c-base-$dt.safetensors"; t "A $c $dt rc=$?"; done; done
) > "$R/tf517.log" 2>&1 &
A=$!
# B: transformers 4.46.3 on the original code
( export PYTHONPATH=/tmp/tf446:/tmp/site
  for dt in bf16 f32; do timeout 150 $S --remote-code $V/original --config $V/patched/config.json --config-name real \
      --weights "$W/real/model.safetensors" --dtype $dt --state original --out "$R/orig446-real-base-$dt.safetensors"; t "B real $dt rc=$?"; done
  for dt in f32 bf16; do timeout 60 $S --remote-code $V/original --config $V/configs/mla.json \
      --weights "$W/mla/model.safetensors" --dtype $dt --state original --out "$R/orig446-mla-base-$dt.safetensors"; t "B mla $dt rc=$?"; done
) > "$R/tf446.log" 2>&1 &
B=$!
# C: Rust ocr on CUDA while the summaries are made
timeout 120 "$W/ocr-patch" ocr $V/page.png --synthetic $V/patched/config.json --mode base --device cuda \
  --max-tokens 32 --json > "$R/ocr-cuda.json" 2> "$R/ocr-cuda.log"; t "ocr rc=$?" | tee -a "$R/ocr-cuda.log"
wait $A; t A done
V1() { timeout 150 "$W/ocr-patch" verify --device cuda --verbose "$@"; echo "rc=$?"; }
V1 --golden "$R/real-base-bf16.safetensors" --golden "$R/real-base-f32.safetensors" > "$R/verify-real.txt" 2>&1; t "verify real $(tail -1 $R/verify-real.txt)"
V1 $(for f in "$R"/group-base-*.safetensors; do echo --golden $f; done) > "$R/verify-group.txt" 2>&1; t "verify group $(tail -1 $R/verify-group.txt)"
wait $B; t B done
ls "$R"/orig446-*.safetensors >/dev/null 2>&1 && { V1 $(for f in "$R"/orig446-*.safetensors; do echo --golden $f; done) > "$R/verify-orig446.txt" 2>&1; t "verify orig $(tail -1 $R/verify-orig446.txt)"; }
for p in "real-base-bf16 orig446-real-base-bf16" "real-base-f32 orig446-real-base-f32" "mla-base-f32 orig446-mla-base-f32" "real-base-bf16 real-base-f32"; do
  set -- $p; [ -f "$R/$1.safetensors" ] && [ -f "$R/$2.safetensors" ] && PYTHONPATH=/tmp/site python3 $V/gpu_summary.py compare "$R/$1.safetensors" "$R/$2.safetensors"
done > "$R/compare.txt" 2>&1
cat "$R/compare.txt"; tail -3 "$R"/*.log; t all done
