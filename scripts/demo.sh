#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job offline. Extra arguments go to examples/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python examples/demo.py "$@"
