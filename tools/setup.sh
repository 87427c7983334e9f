#!/usr/bin/env bash
# Step 1 of 2 for a first result (README "Try it"): find or get ComfyUI 0.20.1 (.ci/host.sh: COMFYUI_PATH,
# the ComfyUI this pack sits in, /opt/ComfyUI, ../shared/host's archive, or with LTXAV_FETCH_COMFYUI=1 a
# git clone) and make the Python environment the demo runs in (.ci/venv.sh: PACK_VENV, else outside the
# source tree) with torch, the pack's requirements and ComfyUI's. Step 2: bash tools/demo.sh.
# --dry-run: say which ComfyUI and which environment, change nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "${1:-}" = --dry-run ]; then
  echo "ComfyUI: $(bash "$here/.ci/host.sh" --dry-run)"
  echo "Python environment: $(bash "$here/.ci/venv.sh")"
  exit 0
fi
host=$(bash "$here/.ci/host.sh")
venv=$(bash "$here/.ci/venv.sh")
echo "setup: ComfyUI $host; Python environment $venv (torch, ray, xfuser, ComfyUI's requirements)" >&2
COMFYUI_PATH=$host LTXAV_SETUP=demo bash "$here/.ci/setup_env.sh"
echo "setup: done. Next, from $here: bash tools/demo.sh" >&2
