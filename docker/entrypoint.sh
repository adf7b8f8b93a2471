#!/bin/sh
# ocr-patch container entrypoint: make sure DeepSeek-OCR's remote code is cached and patched
# before the server imports it, then exec the real server (vLLM's, or yours).
#
#   OCR_PATCH_MODEL      repo to prefetch and patch      (default deepseek-ai/DeepSeek-OCR)
#   OCR_PATCH_REVISION   branch, tag or commit            (default main; pin a commit in production)
#   OCR_PATCH_MODE       fetch | hook | apply | off       (default fetch)
#       fetch: `ocr-patch apply --fetch` downloads the remote code (HF_ENDPOINT, HF_TOKEN honoured),
#              checks it against the lock, patches it; with HF_HUB_OFFLINE=1 it verifies and
#              patches what the image or the volume already holds
#       hook:  rely on the import hook installed in the image (`ocr-patch hook install`); only
#              checks that it is active
#       apply: patch what the cache holds, download nothing
#   OCR_PATCH_ALL=1      fetch every file of the repo (weights too), not only the code
#   OCR_PATCH_ARGS       extra flags for ocr-patch (e.g. "--lock /etc/ocr-patch/extra.lock")
#
# Any failure stops the container (exit 2 from ocr-patch): a server that would load unpatched
# code never starts.
set -eu

model="${OCR_PATCH_MODEL:-deepseek-ai/DeepSeek-OCR}"
revision="${OCR_PATCH_REVISION:-main}"
mode="${OCR_PATCH_MODE:-fetch}"
extra="${OCR_PATCH_ARGS:-}"
all=""
[ "${OCR_PATCH_ALL:-0}" = "1" ] && all="--all"

case "$mode" in
  fetch)
    offline=""
    case "${HF_HUB_OFFLINE:-0}" in 1|ON|on|YES|yes|TRUE|true) offline="--offline" ;; esac
    # shellcheck disable=SC2086
    ocr-patch apply --fetch --model "$model" --revision "$revision" $all $offline $extra
    ;;
  hook)
    ocr-patch hook status --python "${OCR_PATCH_PYTHON:-python3}"
    ;;
  apply)
    # shellcheck disable=SC2086
    ocr-patch apply --model "$model" $extra
    ;;
  off) ;;
  *) echo "entrypoint: OCR_PATCH_MODE must be fetch, hook, apply or off (got '$mode')" >&2; exit 2 ;;
esac

exec "$@"
