# ocr-patch tasks. `just --list` shows them; README.md explains each.
set shell := ["bash", "-euo", "pipefail", "-c"]

# Build the CLI (debug build in target/debug/ocr-patch).
build:
    cargo build

# The Python that `install` / `uninstall` manage (the active one by default).
python := env_var_or_default("PYTHON", "python3")

# Install the `ocr-patch` CLI into ~/.cargo/bin, the `ocr_patch` Python package (the import hook,
# built with maturin) into the active Python, and start the hook there. Idempotent.
install: (wheel "--release")
    cargo install --path . --locked --quiet
    @echo "installed: $(command -v ocr-patch || echo ~/.cargo/bin/ocr-patch)"
    {{python}} -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$(ls -t target/wheels/ocr_patch-*.whl | head -1)"
    "$(command -v ocr-patch || echo ~/.cargo/bin/ocr-patch)" hook install --python "$(command -v {{python}})"

# Remove what `just install` installed: the hook, the Python package, the CLI.
uninstall:
    -"$(command -v ocr-patch || echo ~/.cargo/bin/ocr-patch)" hook uninstall --python "$(command -v {{python}})"
    -{{python}} -m pip uninstall -y -q ocr-patch
    cargo uninstall ocr-patch || true

# Build the `ocr_patch` wheel (PyO3 extension + hook) into target/wheels; `just wheel --release`.
wheel *flags:
    {{python}} -m pip show -q maturin >/dev/null 2>&1 || {{python}} -m pip install -q --disable-pip-version-check maturin
    {{python}} -m maturin build {{flags}} -o target/wheels

# The main job, offline, on an embedded default: a throw-away Hugging Face cache holding our
# fixture model is diagnosed, patched, checked, reverted.
demo: build
    #!/usr/bin/env bash
    set -euo pipefail
    bin="$PWD/target/debug/ocr-patch"; hub="$(mktemp -d)/hub"; trap 'rm -rf "$(dirname "$hub")"' EXIT
    repo="$hub/models--deepseek-ai--DeepSeek-OCR"; commit=9f30c71f441d010e5429c532364a86705536c53a
    mkdir -p "$repo/blobs" "$repo/snapshots/$commit" "$repo/refs"
    printf '%s' "$commit" > "$repo/refs/main"
    for f in tests/fixtures/tinyocr/*; do
      sha=$(sha256sum "$f" | cut -d' ' -f1); cp "$f" "$repo/blobs/$sha"
      ln -s "../../blobs/$sha" "$repo/snapshots/$commit/$(basename "$f")"
    done
    lock=(--cache-dir "$hub" --lock tests/fixtures/lock.toml)
    echo "== doctor (as if transformers 5.0.0 were installed)"; "$bin" doctor "${lock[@]}" --transformers-version 5.0.0
    echo "== check (exit 1: patches pending)"; "$bin" check "${lock[@]}" || echo "exit code $?"
    echo "== apply"; "$bin" apply "${lock[@]}"
    echo "== apply again (nothing to do)"; "$bin" apply "${lock[@]}"
    echo "== check"; "$bin" check "${lock[@]}" && echo "exit code 0"
    echo "== revert"; "$bin" revert "${lock[@]}"

# Every test CI runs: the Rust suite, then the Python end-to-end matrix.
test: test-rust test-e2e

# Rust unit and integration tests (no network, no GPU).
test-rust:
    cargo test --all-targets

# The fixture model under real transformers + torch (CPU), one release at a time.
# Needs the venvs that tests/e2e/setup_matrix.sh builds (downloads torch and transformers once).
test-e2e: build wheel
    #!/usr/bin/env bash
    set -euo pipefail
    eval "$(tests/e2e/setup_matrix.sh)"
    export OCR_PATCH_BIN="$PWD/target/debug/ocr-patch"
    "$OCR_PATCH_E2E_PYTHON" -m pytest tests/e2e -q -p no:cacheprovider

# Tests against the real remote code (fetched into .upstream/hub, never committed).
test-upstream:
    OCR_PATCH_UPSTREAM="$PWD/.upstream/hub" cargo test --test patch_engine
    OCR_PATCH_UPSTREAM="$PWD/.upstream/hub" just test-e2e

# Regenerate the locks after changing patches/: the Hub files' (needs .upstream/hub) and the fixture's.
lock: build
    target/debug/ocr-patch lock --upstream .upstream/hub --source deepseek-ai/DeepSeek-OCR --out patches/lock.toml
    target/debug/ocr-patch lock --upstream tests/fixtures/tinyocr --source tests/fixtures/tinyocr --out tests/fixtures/lock.toml
    cargo build

# Speed of `apply` on a cold and on an already patched cache (see docs/benchmarks.md).
bench-apply:
    cargo build --release
    tests/bench/apply.sh target/release/ocr-patch

# The GPU fast path against transformers (patched remote code, eager and sdpa) on this machine's
# GPU: needs the CUDA toolkit, torch + transformers in python3, the Hub's config.json and the
# patched remote code in REMOTE (`ocr-patch apply --path`). Synthetic weights of the real config.
# On the lent device (no cargo there) use bench/gpu/fast.sh. See docs/benchmarks.md.
bench config="../shared/data/deepseek-ocr/config.json" remote=".gpu/remote" *args="":
    #!/usr/bin/env bash
    set -euo pipefail
    # CUTLASS's GEMM with SAM's GELU fused where its headers are (pip install nvidia-cutlass)
    features=cuda; if [ -n "${CUTLASS_DIR:-}" ] || python3 -c 'import cutlass_library' 2>/dev/null; then features=cutlass; fi
    cargo build --release --features "$features" --bin ocr-patch --bin ocr-patch-synth
    w="target/bench-weights"; mkdir -p "$w"; cp "{{config}}" "$w/config.json"
    [ -s "$w/model.safetensors" ] || target/release/ocr-patch-synth --config "$w/config.json" --seed 1 -o "$w/model.safetensors" --dtype bf16
    target/release/ocr-patch bench --model-dir "$w" --remote-code "{{remote}}" \
      --gpu "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" --out-file target/bench.json {{args}}

# Load test of `ocr-patch serve` on loopback: 1,000 requests from 64 clients on the synthetic
# `cpu` model (gated test tests/serve_load.rs; numbers in docs/benchmarks.md).
load-test:
    OCR_PATCH_LOAD_TEST=1 cargo test --test serve_load -- --nocapture
