#!/usr/bin/env bash
# The oldest releases pyproject.toml allows: creates .venv-oldest with torch and transformers at their lower bounds
# (everything else as scripts/setup.sh installs it), once, and runs there the tests of the library contracts:
# transformers' common tests, the hand-written contract tests, the Auto classes and pipeline, the model, the
# configuration and the image processor. scripts/test.sh calls it in CI. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r torch_version transformers_version < <(python3 - <<'EOF'
import re
from pathlib import Path

text = Path("pyproject.toml").read_text()
bounds = [re.search(rf'"{name}>=([0-9][^",\s]*)', text) for name in ("torch", "transformers")]
if not all(bounds):
    raise SystemExit('pyproject.toml must give "torch>=X" and "transformers>=Y" in its dependencies.')
print(*(bound.group(1) for bound in bounds))
EOF
)
venv=.venv-oldest
bash scripts/ensure_venv.sh $venv "torch==$torch_version" "transformers==$transformers_version" -e ".[dev]"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "Oldest allowed releases: torch $torch_version, transformers $transformers_version"
exec $venv/bin/python -m pytest -q tests/test_transformers_common.py tests/test_transformers_contracts.py \
  tests/test_auto_and_pipeline.py tests/test_modeling.py tests/test_config.py tests/test_image_processing.py "$@"
