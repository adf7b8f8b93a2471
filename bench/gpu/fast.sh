#!/usr/bin/env bash
# The GPU fast path on the device machine (docs/benchmarks.md, "The GPU fast path"): the kernel
# tests, `ocr-patch bench` (Rust fast path vs transformers eager and sdpa, same GPU, same run)
# and an Nsight Compute profile of batch-1 decode steps. Run from the repository root, with the
# ignored folder $G (default .gpu/gpu) holding:
#   bin.tar.gz   ocr-patch, ocr-patch-synth and kernel_tests (the lib's test binary), built here:
#                eval "$(../shared/tools/cuda-build-env.sh)"
#                cargo build --release --features cutlass --target-dir /work/target-cuda \
#                  --bin ocr-patch --bin ocr-patch-synth
#                cargo test --release --features cutlass --target-dir /work/target-cuda --lib --no-run
#                (`cutlass`: CUTLASS's headers, CUTLASS_DIR or `pip install nvidia-cutlass`; or
#                `cuda` without the CUTLASS GEMM)
#   tf_peer.py   bench/gpu/tf_peer.py (the peer), fast.sh (this file)
# and .gpu/config.json + .gpu/remote/ (the patched remote code) as bench/gpu/run.sh describes,
# .whl/ the wheels the remote code needs. Carry [".gpu", ".whl"].
# Usage: bash $G/fast.sh [STEPS (default "tests bench profile vprofile"; "gprofile": ncu over a
# Gundam 3x2 encode; "pdl": the Rust side alone with and without programmatic dependent launch;
# "knobs": the Rust side as it is and with
# each NAME=VALUE of $KNOBS; "trace": the batch-1 step's timeline in the graph, `bench
# --profile trace`); CUBLAS=0 skips the bench's second run with every projection through cuBLAS;
# NCU_CACHE=none profiles with warm caches (ncu flushes them between kernels by default)]
# bench/gpu/ab.sh then compares the vision encode against a base binary on the same machine.
# Results go to $OUT: gpu.txt, kernel-tests.log, bench.json, bench.log, profile.csv (decode),
# vprofile.csv (vision), gprofile.csv (Gundam).
set -uo pipefail
G=${G:-.gpu/gpu}
OUT=${OUT:-/tmp/ocrp-out}
WORK=${WORK:-/tmp/ocrp-fast}
STEPS=${1:-tests bench profile vprofile}
mkdir -p "$OUT" "$WORK/w"
NVPIP=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia/cu13/lib
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:$NVPIP:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
tar -xzf "$G/bin.tar.gz" -C "$WORK"
case " $STEPS " in *" tests "*)
  echo "== kernel tests"
  timeout 300 "$WORK/kernel_tests" --test-threads=1 --nocapture model::kernels model::fast bench:: \
    2>&1 | tee "$OUT/kernel-tests.log" | grep -E "^test |max|agree|banned|result|panicked" ;;
esac
cp .gpu/config.json "$WORK/w/config.json"
if [ ! -s "$WORK/w/model.safetensors" ]; then
  echo "== synthetic weights of the real config"
  "$WORK/ocr-patch-synth" --config "$WORK/w/config.json" --seed 1 -o "$WORK/w/model.safetensors" --dtype bf16 2>&1 | tail -2
fi
case " $STEPS " in *" bench "*)
  echo "== ocr-patch bench"
  timeout 480 "$WORK/ocr-patch" bench --model-dir "$WORK/w" --remote-code .gpu/remote \
    --peer-script "$G/tf_peer.py" --gpu "$GPU" --out-file "$OUT/bench.json" 2> "$OUT/bench.log"
  echo "rc=$?"; tail -c 3000 "$OUT/bench.log"
  if [ "${CUBLAS:-1}" != 0 ]; then
    echo "== the Rust side again, every projection through cuBLAS (OCR_PATCH_LINEAR=cublas)"
    OCR_PATCH_LINEAR=cublas timeout 200 "$WORK/ocr-patch" bench --model-dir "$WORK/w" --gpu "$GPU" \
    --out-file "$OUT/bench-cublas.json" 2> "$OUT/bench-cublas.log" | grep -E "decode|memory"
  fi ;;
esac
case " $STEPS " in *" pdl "*)
  echo "== the Rust side with and without programmatic dependent launch (OCR_PATCH_PDL=0)"
  for pdl in 1 0; do
    OCR_PATCH_PDL=$pdl timeout 200 "$WORK/ocr-patch" bench --model-dir "$WORK/w" --gpu "$GPU" \
      --out-file "$OUT/bench-pdl$pdl.json" 2> "$OUT/bench-pdl$pdl.log" | sed "s/^/pdl=$pdl /"
  done ;;
esac
case " $STEPS " in *" share "*)
  echo "== the split attention's fewest keys per block (OCR_PATCH_ATTN_SHARE)"
  for share in 32 64 128 256 512; do
    OCR_PATCH_ATTN_SHARE=$share timeout 200 "$WORK/ocr-patch" bench --model-dir "$WORK/w" --gpu "$GPU" \
      --out-file "$OUT/bench-share$share.json" 2> /dev/null | grep "decode" | sed "s/^/share=$share /"
  done ;;
esac
case " $STEPS " in *" knobs "*)
  echo "== the Rust side as it is, and with each of KNOBS (NAME=VALUE ...): ${KNOBS:-}"
  for kv in default ${KNOBS:-}; do
    f=${kv//=/-}
    if [ "$kv" = default ]; then set --; else set -- "$kv"; fi
    env "$@" timeout 200 "$WORK/ocr-patch" bench --model-dir "$WORK/w" --gpu "$GPU" \
      --out-file "$OUT/bench-$f.json" 2> "$WORK/bench-$f.log" | grep -E "decode|memory|vision" | sed "s/^/$kv /"
    grep -iE "error|panicked" "$WORK/bench-$f.log" | tail -4
  done ;;
esac
case " $STEPS " in *" trace "*)
  echo "== the batch-1 step's timeline in the CUDA graph (kernels with probes), PDL: ${TRACE_PDL:-1}"
  for pdl in ${TRACE_PDL:-1}; do
    OCR_PATCH_PDL=$pdl timeout 200 "$WORK/ocr-patch" bench --profile trace --steps 32 --model-dir "$WORK/w" \
      > "$OUT/trace-pdl$pdl.json" 2> "$OUT/trace-pdl$pdl.log"
    echo "pdl=$pdl rc=$?"; tail -25 "$OUT/trace-pdl$pdl.log"
  done ;;
esac
# Per-kernel totals of an ncu CSV (time, share, HBM GB/s).
summarise() {
  python3 - "$1" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
h = rows[head]; data = rows[head + 2:]
k, t, rd, wr = (h.index(c) for c in ("Kernel Name", "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum"))
agg = collections.defaultdict(lambda: [0, 0.0, 0.0])
num = lambda s: float(s.replace(",", "")) if s else 0.0
unit = rows[head + 1]
tf = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}.get(unit[t], 1.0)
bf = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(unit[rd], 1.0)
for r in data:
    a = agg[r[k][:60]]; a[0] += 1; a[1] += num(r[t]) * tf; a[2] += (num(r[rd]) + num(r[wr])) * bf
tot = sum(a[1] for a in agg.values())
print(f"{'kernel':60s} {'n':>4s} {'us':>9s} {'%':>5s} {'GB/s':>7s}")
for name, (n, ns, b) in sorted(agg.items(), key=lambda x: -x[1][1]):
    print(f"{name:60s} {n:4d} {ns/1e3:9.1f} {100*ns/tot:5.1f} {b/ns if ns else 0:7.0f}")
print(f"total kernel time {tot/1e3:.1f} us over the profiled steps")
PY
}
case " $STEPS " in *" profile "*)
  echo "== ncu: 2 eager batch-1 decode steps (caches kept warm between kernels, as in a step)"
  timeout 240 ncu --profile-from-start off --clock-control none --cache-control none --csv --page raw \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    "$WORK/ocr-patch" bench --profile --steps 2 --model-dir "$WORK/w" > "$OUT/profile.csv" 2> "$OUT/profile.log"
  echo "rc=$?"
  summarise "$OUT/profile.csv" ;;
esac
case " $STEPS " in *" gprofile "*)
  echo "== ncu: one Gundam 3x2 vision encode on the fast path"
  timeout 240 ncu --profile-from-start off --clock-control none --cache-control "${NCU_CACHE:-all}" --csv --page raw \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    "$WORK/ocr-patch" bench --profile vision-gundam --model-dir "$WORK/w" > "$OUT/gprofile.csv" 2> "$OUT/gprofile.log"
  echo "rc=$?"
  summarise "$OUT/gprofile.csv" ;;
esac
case " $STEPS " in *" vprofile "*)
  echo "== ncu: one Base vision encode on the fast path"
  timeout 240 ncu --profile-from-start off --clock-control none --cache-control "${NCU_CACHE:-all}" --csv --page raw \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    "$WORK/ocr-patch" bench --profile vision --model-dir "$WORK/w" > "$OUT/vprofile.csv" 2> "$OUT/vprofile.log"
  echo "rc=$?"
  summarise "$OUT/vprofile.csv" ;;
esac
