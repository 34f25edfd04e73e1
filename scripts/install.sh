#!/usr/bin/env bash
# Create .venv and install prunebench into it (editable, with the test tools).
# - No GPU (no nvidia-smi): torch is pinned to the CPU build 2.13.0 in *every* pip call, or pip pulls several GB of
#   CUDA wheels. On a GPU machine torch is left to pip, which gives the usual CUDA build.
# - torchvision is never installed: it has no CPU build and, installed, breaks transformers' image processors.
# - lmms-eval 0.7.3 hard-requires torchvision, so it goes in with --no-deps plus the few packages it really needs.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
CONSTRAINTS=.venv/constraints.txt
# lmms-eval 0.7.3 imports filelock._api, which filelock 4 no longer has.
echo "filelock<4" > "$CONSTRAINTS"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "torch==${TORCH_VERSION:-2.13.0}" >> "$CONSTRAINTS"
  "${PIP[@]}" install -c "$CONSTRAINTS" "torch==${TORCH_VERSION:-2.13.0}"
fi
# openpyxl: MMBench's scoring writes its per-question table as .xlsx (pandas needs it, lmms-eval does not declare it).
"${PIP[@]}" install -c "$CONSTRAINTS" -e '.[test]' \
  accelerate loguru sacrebleu evaluate pytz tenacity datasets pytablewriter openpyxl
"${PIP[@]}" install --no-deps lmms-eval==0.7.3
if .venv/bin/python -c "import torchvision" 2>/dev/null; then
  echo "torchvision is installed in .venv; it breaks transformers image processors here: pip uninstall torchvision" >&2
  exit 1
fi
