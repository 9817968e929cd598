#!/usr/bin/env bash
# Usage: bash scripts/ensure_venv.sh VENV PIP_ARGUMENTS...
# Creates the virtual environment VENV and runs `pip install PIP_ARGUMENTS` in it, once; again when pyproject.toml
# changes (VENV/.step-hf-installed holds the hash it was installed for).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1
shift
stamp=$venv/.step-hf-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "$@"
echo "$want" > "$stamp"
