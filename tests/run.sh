#!/usr/bin/env bash
# The one test command: find (or unpack) the ComfyUI host, prepare the venv (idempotent; see
# .ci/setup_env.sh), then run every test. Extra arguments go to pytest (e.g. `-m quick`); with a path among
# them (tests/test_plan.py, tests/test_plan.py::test_x) pytest runs those instead of the whole folder.
# The host: $COMFYUI_PATH, else the ComfyUI this pack sits in, else /opt/ComfyUI, else ../shared/host's
# archive unpacked into a cache (.ci/host.sh); the venv: .ci/venv.sh (outside custom_nodes in the install
# layout). With CI=true a missing host or browser fails the run instead of skipping tests.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if host=$(bash "$here/.ci/host.sh"); then
  export COMFYUI_PATH=$host
elif [ "${CI:-}" = true ]; then
  exit 1
else
  echo "run.sh: no ComfyUI host: host tests will skip" >&2
  export COMFYUI_PATH=${COMFYUI_PATH:-/opt/ComfyUI}
fi
bash "$here/.ci/setup_env.sh"
cd "$here"
where=(tests)
for arg in "$@"; do
  case $arg in tests/*|./tests/*) where=() ;; esac
done
exec "$(bash "$here/.ci/venv.sh")/bin/python" -m pytest "${where[@]}" "$@"
