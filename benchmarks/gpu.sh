#!/usr/bin/env bash
# The speed benchmark on one NVIDIA GPU: the LLaVA-1.5-7B and -13B and Qwen2.5-VL-7B architectures with random fp16
# weights, on sdpa, every registered method at budgets 192/128/64 (budget-free ones once; VisiPruner on eager and on
# sdpa; Qwen: a 448 px image, 256 vision tokens, so 64 is retain=0.25), 10 timed rounds. Writes one JSON and one
# Markdown table: results/bench/gpu.json and results/bench/gpu.md.
# Sized from counts for one H100 (80 GB; the 13B model takes 26 GB): ~22 timed configurations x 11 rounds x 2 models
# of 20-100 ms prefills, plus model set-up, is 2-4 minutes; the budget is 8 (docs/cost-counters.md).
#   bash benchmarks/gpu.sh            # REPEATS=10 OUTPUT=results/bench/gpu.json by default
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "benchmarks/gpu.sh needs an NVIDIA GPU; on CPU run: python -m harness.bench --threads 1 --clock process" >&2
  exit 1
fi
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m harness.bench --device cuda --model llava7b llava13b qwen25vl7b --budgets 192 128 64 \
  --repeats "${REPEATS:-10}" --output "${OUTPUT:-results/bench/gpu.json}"
