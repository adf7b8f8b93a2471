#!/usr/bin/env bash
# Builds the environments of the end-to-end matrix (tests/e2e) and prints the variables that
# point the suite at them:
#
#   tests/e2e/setup_matrix.sh                      # default release list
#   tests/e2e/setup_matrix.sh 4.46.3 5.0.0         # only these releases
#   eval "$(tests/e2e/setup_matrix.sh)" && "$OCR_PATCH_E2E_PYTHON" -m pytest tests/e2e
#
# Two venvs, because transformers from 5.10 needs torch >= 2.7:
#   $VENV      (default .venv-e2e, or $OCR_PATCH_E2E_VENV): torch 2.6.0 + torchvision 0.21.0
#   $VENV-new  torch 2.11.0 + torchvision 0.26.0, for 5.10 and later; it also gets 4.46.3,
#              the reference, so every release is compared under the same torch.
# Each release goes to $VENV/tf/<version> (pip --target), put first on PYTHONPATH per run.
# Both venvs hold the remote code's own packages and pytest, never transformers itself.
# The venv folders must stay out of git (.venv-e2e* in .gitignore or .git/info/exclude).
set -euo pipefail

DEFAULT_VERSIONS="4.46.3 4.48.0 4.49.0 4.54.0 4.57.1 5.0.0 5.3.0 5.4.0 5.24.0"
VENV="${OCR_PATCH_E2E_VENV:-$(pwd)/.venv-e2e}"
VENV_NEW="$VENV-new"
PYTHON="${PYTHON:-python3}"
PACKAGES="addict easydict einops matplotlib numpy pillow requests tqdm safetensors pytest"
VERSIONS="${*:-$DEFAULT_VERSIONS}"

# make_venv DIR TORCH TORCHVISION: a venv with CPU torch and the remote code's packages.
make_venv() {
  local dir="$1" torch="$2" vision="$3"
  if [ ! -x "$dir/bin/python" ]; then
    "$PYTHON" -m venv "$dir" >&2
    "$dir/bin/pip" install -q --upgrade pip >&2
    # From PyPI, the only package index CI reaches (its Linux wheels carry CUDA libraries,
    # unused here: the suite runs on CPU).
    "$dir/bin/pip" install -q "torch==$torch" "torchvision==$vision" >&2
    # shellcheck disable=SC2086
    "$dir/bin/pip" install -q $PACKAGES >&2
  fi
}

# add_release DIR VERSION: transformers==VERSION (and its own dependencies) in DIR/tf/VERSION.
add_release() {
  local dir="$1" version="$2"
  [ -d "$dir/tf/$version/transformers" ] && return 0
  echo "installing transformers $version into $dir/tf/$version" >&2
  "$dir/bin/pip" install -q --target "$dir/tf/$version" "transformers==$version" >&2
}

# needs_new_torch VERSION: true for releases from 5.10 on.
needs_new_torch() {
  local major minor
  IFS=. read -r major minor _ <<<"$1"
  [ "$major" -gt 5 ] || { [ "$major" -eq 5 ] && [ "$minor" -ge 10 ]; }
}

base_needed=0; new_needed=0
for v in $VERSIONS; do
  if needs_new_torch "$v"; then new_needed=1; else base_needed=1; fi
done

# The reference release is always installed in each venv that is used.
if [ "$base_needed" = 1 ]; then
  make_venv "$VENV" 2.6.0 0.21.0
  add_release "$VENV" 4.46.3
fi
if [ "$new_needed" = 1 ]; then
  make_venv "$VENV_NEW" 2.11.0 0.26.0
  add_release "$VENV_NEW" 4.46.3
fi
for v in $VERSIONS; do
  if needs_new_torch "$v"; then add_release "$VENV_NEW" "$v"; else add_release "$VENV" "$v"; fi
done

echo "export OCR_PATCH_E2E_PYTHON='$VENV/bin/python' OCR_PATCH_E2E_TF_ROOT='$VENV/tf'"
echo "export OCR_PATCH_E2E_PYTHON_NEW='$VENV_NEW/bin/python' OCR_PATCH_E2E_TF_ROOT_NEW='$VENV_NEW/tf'"
echo "export OCR_PATCH_E2E_VERSIONS='$(echo $VERSIONS | tr ' ' ',')'"
