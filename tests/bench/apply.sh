#!/usr/bin/env bash
# Benchmark of `ocr-patch apply` (a benchmark, never a test): median wall time of
#   cold    the first patch of a cached model (fresh hub cache each run)
#   warm    `apply` on an already patched cache (the entrypoint's usual case)
# against the targets of issue 2 (cold < 200 ms, warm < 50 ms), printed as ratios (wall / target).
# CPU time (user + sys) is printed too: on a loaded machine it is the figure that does not
# depend on what else runs.
#   tests/bench/apply.sh [BIN] [RUNS]     BIN defaults to target/release/ocr-patch
# Uses the real remote code when .upstream/hub holds it, else the fixture model.
set -euo pipefail
bin="$(realpath "${1:-target/release/ocr-patch}")"; runs="${2:-21}"
src=tests/fixtures/tinyocr; lock=(--lock tests/fixtures/lock.toml); what="fixture tinyocr"
if [ -f .upstream/hub/modeling_deepseekv2.py ]; then src=.upstream/hub; lock=(); what="real DeepSeek-OCR remote code"; fi
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

make_cache() { # make_cache DIR: a hub cache with the model as blobs + snapshot symlinks
  local repo="$1/models--deepseek-ai--DeepSeek-OCR" commit=9f30c71f441d010e5429c532364a86705536c53a
  mkdir -p "$repo/blobs" "$repo/snapshots/$commit" "$repo/refs"; printf '%s' "$commit" > "$repo/refs/main"
  for f in "$src"/*.py "$src"/config.json; do
    local sha; sha=$(sha256sum "$f" | cut -d' ' -f1); cp "$f" "$repo/blobs/$sha"
    ln -s "../../blobs/$sha" "$repo/snapshots/$commit/$(basename "$f")"
  done
}
# ms CMD...: wall and CPU (user + sys, from /usr/bin/time: 10 ms steps) microseconds of one run.
ms() {
  local t0 t1
  t0=$(date +%s%N); /usr/bin/time -f "%U %S" -o "$work/cpu" "$@" >/dev/null 2>&1; t1=$(date +%s%N)
  echo "$(( (t1 - t0) / 1000 )) $(awk '{printf "%d", ($1 + $2) * 1000000}' "$work/cpu")"
}
median() { sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]/1000}'; }
col() { awk -v c="$1" '{print $c}'; }

mkdir -p "$work/none"
for i in $(seq "$runs"); do make_cache "$work/cold$i"; done
coldrun=$(for i in $(seq "$runs"); do ms "$bin" apply --cache-dir "$work/cold$i" --modules-dir "$work/none" "${lock[@]}"; done)
warmrun=$(for i in $(seq "$runs"); do ms "$bin" apply --cache-dir "$work/cold1" --modules-dir "$work/none" "${lock[@]}"; done)
cold=$(col 1 <<<"$coldrun" | median); coldcpu=$(col 2 <<<"$coldrun" | median)
warm=$(col 1 <<<"$warmrun" | median); warmcpu=$(col 2 <<<"$warmrun" | median)
"$bin" check --cache-dir "$work/cold1" --modules-dir "$work/none" "${lock[@]}" >/dev/null   # the bench patched for real
printf 'apply on %s, %s runs, %s (%s cores, load average %s)\n' "$what" "$runs" "$(uname -m)" "$(nproc)" "$(cut -d' ' -f1 /proc/loadavg)"
printf '%-7s %9s %9s %9s %9s\n' case wall_ms cpu_ms target_ms ratio
awk -v c="$cold" -v cc="$coldcpu" -v w="$warm" -v wc="$warmcpu" 'BEGIN {
  printf "%-7s %9.1f %9.1f %9d %9.2f\n", "cold", c, cc, 200, c / 200
  printf "%-7s %9.1f %9.1f %9d %9.2f\n", "warm", w, wc, 50, w / 50 }'
