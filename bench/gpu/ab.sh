#!/usr/bin/env bash
# A/B of the vision encode on the device machine, after bench/gpu/fast.sh has made the weights
# ($WORK/w) and unpacked the new binaries ($WORK): a base binary ($G/base.tar.gz or .xz holding
# `ocr-patch-base`, built here from the commit to compare against; skipped when absent), the new
# `ocr-patch`, and the new one with each knob of $AB_KNOB (space-separated; a knob is
# NAME=VALUE, or several joined by commas), alternating, ROUNDS times (default 2); each run
# times 10 encodes after 2 warm-ups (`ocr-patch bench`, the Rust side only). JSON per run under
# $OUT (default /tmp/ab). Usage: [AB_KNOB="A=0 B=0 A=0,B=0"] bash bench/gpu/ab.sh [ROUNDS]
set -uo pipefail
G=${G:-.gpu/gpu}
WORK=${WORK:-/tmp/ocrp-fast}
OUT=${OUT:-/tmp/ab}
mkdir -p "$OUT" /tmp/base
NVPIP=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia/cu13/lib
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:$NVPIP:${LD_LIBRARY_PATH:-}
variants=(new)
BASE=$(ls "$G"/base.tar.* 2>/dev/null | head -1)
if [ -n "$BASE" ]; then
  tar -xf "$BASE" -C /tmp/base
  variants=(base new)
fi
read -r -a knobs <<< "${AB_KNOB:-}"
for i in $(seq "${1:-2}"); do
  for v in "${variants[@]}" ${knobs[@]+"${knobs[@]}"}; do
    B=$WORK/ocr-patch; [ "$v" = base ] && B=/tmp/base/ocr-patch-base
    E=(); case "$v" in base | new) ;; *) IFS=, read -r -a E <<< "$v" ;; esac
    env ${E[@]+"${E[@]}"} "$B" bench --model-dir "$WORK/w" --batches 8 --steps 16 --decode-runs 1 --repeat 10 \
      --out-file "$OUT/ab-${v//[=,]/_}-$i.json" 2>/dev/null | grep -E "vision encode" | sed "s/^/$v $i /"
  done
done
