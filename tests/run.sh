#!/usr/bin/env bash
# The one test command: prepare the test venv (idempotent; see .ci/setup_env.sh), then run every test.
# Host tests use the ComfyUI checkout at $COMFYUI_PATH (default /opt/ComfyUI) and skip, saying so, without it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/.ci/setup_env.sh"
cd "$here"
exec "${PACK_VENV:-$here/.venv}/bin/python" -m pytest tests "$@"
