#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite on CPU. Extra arguments go to pytest. The one command that
# changes the system: where it runs as root with apt-get it installs Chromium for the demo's browser test
# (scripts/install_browser.sh; STEP_BROWSER_TESTS=0 leaves it out, and that test is then skipped).
# In CI (CI=true, no arguments) it also runs the slow common, export (the whole export matrix) and calibration tests, the ExecuTorch export tests in their
# own environment (scripts/test_executorch.sh), and the contract tests against the oldest torch and transformers
# that pyproject.toml allows (scripts/test_oldest.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${CI:-}" != "true" ] || [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q
.venv/bin/python -m pytest -q -m slow tests/test_transformers_common.py tests/test_export.py tests/test_export_matrix.py \
    tests/test_calibrate.py
bash scripts/test_executorch.sh
bash scripts/test_oldest.sh
