#!/usr/bin/env bash
# The ExecuTorch export tests: creates .venv-executorch with step-hf's dev and executorch extras (torch as
# scripts/setup.sh installs it), once, and runs there the tests that need ExecuTorch. Kept out of .venv because
# executorch brings torchao, which transformers then imports with every model. scripts/test.sh calls it in CI.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-executorch
bash scripts/ensure_venv.sh $venv "${STEP_TORCH_SPEC:-torch==2.13.0}" -e ".[dev,executorch]"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec $venv/bin/python -m pytest -q -m "slow or not slow" tests/test_export.py -k executorch "$@"
