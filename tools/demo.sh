#!/usr/bin/env bash
# Step 2 of 2 (README "Try it"): the demo, tools/demo.py, with the ComfyUI and the Python environment
# tools/setup.sh set up. Arguments go to demo.py (--help lists them).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
host=$(bash "$here/.ci/host.sh")
venv=$(bash "$here/.ci/venv.sh")
if [ ! -x "$venv/bin/python" ]; then
  echo "demo.sh: no Python environment at $venv: run bash tools/setup.sh first" >&2
  exit 1
fi
COMFYUI_PATH=$host exec "$venv/bin/python" "$here/tools/demo.py" "$@"
