#!/usr/bin/env bash
# Creates .venv with step-hf (editable), its test tools and the demo's Gradio, once; reinstalls when pyproject.toml
# changes. Installs nothing outside .venv (the browser for the demo's browser test comes with scripts/test.sh).
# CPU machines get torch 2.13.0 (a CPU wheel); set STEP_TORCH_SPEC to choose another build, e.g. on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh .venv "${STEP_TORCH_SPEC:-torch==2.13.0}" -e ".[dev,demo]"
