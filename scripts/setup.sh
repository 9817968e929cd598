#!/usr/bin/env bash
# Creates .venv with step-hf (editable), its test tools and the demo's Gradio, once; reinstalls when pyproject.toml
# changes. Installs Chromium for the demo's browser test where it can (scripts/install_browser.sh).
# CPU machines get torch 2.13.0 (a CPU wheel); set STEP_TORCH_SPEC to choose another build, e.g. on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_browser.sh
stamp=.venv/.step-hf-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${STEP_TORCH_SPEC:-torch==2.13.0}" -e ".[dev,demo]"
echo "$want" > "$stamp"
