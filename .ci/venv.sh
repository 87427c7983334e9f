#!/usr/bin/env bash
# Print the virtualenv the pack's set-up, demo and tests use (created by .ci/setup_env.sh):
#   1. $PACK_VENV when set (e.g. ComfyUI's own venv);
#   2. in the install layout (this folder in a ComfyUI's custom_nodes): outside the source tree, in the
#      pack's cache: ${LTXAV_HOST_CACHE:-$XDG_CACHE_HOME/ltxav-pack or ~/.cache/ltxav-pack}/venv
#      (ComfyUI scans custom_nodes; a 2.7 GB venv does not belong there);
#   3. else .venv in the checkout (git ignores it).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PACK_VENV:-}" ]; then
  echo "$PACK_VENV"
elif [ "$(basename "$(dirname "$here")")" = custom_nodes ]; then
  echo "${LTXAV_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ltxav-pack}/venv"
else
  echo "$here/.venv"
fi
