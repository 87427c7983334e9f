#!/usr/bin/env bash
# Create (or reuse) the pack's virtualenv (.ci/venv.sh says where): torch (the CPU build where it lies on
# disk), the pack's requirements, and with them the tests' (pytest, playwright, Chromium) unless
# LTXAV_SETUP=demo (tools/setup.sh: what the demo needs); plus the ComfyUI host's requirements when a host
# is present at $COMFYUI_PATH (tests/run.sh and tools/setup.sh set it from .ci/host.sh). Idempotent;
# safe on a fresh clone, and on a ComfyUI's own venv (PACK_VENV): what imports already is left as it is.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$here/.ci/venv.sh")
host=${COMFYUI_PATH:-$(bash "$here/.ci/host.sh" || true)}
py=${PYTHON:-python3}
tests=true
[ "${LTXAV_SETUP:-}" = demo ] && tests=false

[ -x "$venv/bin/python" ] || { mkdir -p "$(dirname "$venv")" && "$py" -m venv "$venv"; }

# Headless Chromium for tests/test_browser_ui.py: Debian's package (Playwright only drives it, no browser
# download). Installed when absent and allowed (CI=true, or running as root); when apt-get is missing or
# fails, those tests skip, saying why.
if $tests && ! command -v chromium >/dev/null 2>&1 && { [ "${CI:-}" = true ] || [ "$(id -u)" = 0 ]; }; then
  if command -v apt-get >/dev/null 2>&1 && { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install \
       -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 chromium fonts-liberation; } >"$venv/apt-chromium.log" 2>&1
  then
    echo "setup_env: installed Debian's chromium for the browser UI tests" >&2
  else
    echo "setup_env: could not install chromium with apt-get (see $venv/apt-chromium.log): browser UI tests will skip" >&2
  fi
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# torch 2.13.0 CPU lies on this machine's disk; a bare "torch" would pull a multi-GB CUDA build.
"$venv/bin/python" -c 'import torch' 2>/dev/null || "${pip[@]}" torch==2.13.0
if $tests; then
  "${pip[@]}" -r "$here/requirements-test.txt" -c "$here/.ci/constraints.txt"
else
  "${pip[@]}" -r "$here/requirements.txt" psutil -c "$here/.ci/constraints.txt"
fi

if [ -f "$host/comfy/ldm/lightricks/av_model.py" ]; then
  if ! "$venv/bin/python" -c 'import aiohttp, comfy_aimdo, av, torchsde, spandrel, kornia' 2>/dev/null; then
    grep -vE '^(torch|torchvision|torchaudio)\s*$' "$host/requirements.txt" > "$venv/host-requirements.txt"
    "${pip[@]}" -r "$venv/host-requirements.txt" -c "$here/.ci/constraints.txt"
  fi
  # torchaudio's compiled extension does not load beside this torch; ComfyUI's LTX audio code only
  # uses its pure-Python parts, so install it without deps and drop the .so files.
  if [ ! -d "$site/torchaudio" ]; then
    "${pip[@]}" --no-deps torchaudio==2.11.0
    rm -f "$site"/torchaudio/lib/*.so
  fi
  # PyPI's torchvision does not find its C++ ops beside CPU torch 2.13; declare their schemas
  # when torchvision is first imported (this environment only, never part of the pack; not where
  # torchvision imports as it is, e.g. a ComfyUI's own CUDA venv).
  if [ -f "$site/_ltxav_tv_shim.pth" ] || ! "$venv/bin/python" -c 'import torchvision' 2>/dev/null; then
    cp "$here/.ci/torchvision_shim.py" "$site/_ltxav_tv_shim.py"
    echo "import _ltxav_tv_shim" > "$site/_ltxav_tv_shim.pth"
  fi
  if $tests; then
    # tiny GGUF checkpoints carry their config for ComfyUI's model detection (tests/helpers/tiny_gguf.py):
    # every process of the venv (tests, ComfyUI servers, Ray workers) hands it over, as safetensors metadata
    cp "$here/.ci/tiny_gguf_shim.py" "$site/_ltxav_tiny_gguf_shim.py"
    echo "import _ltxav_tiny_gguf_shim" > "$site/_ltxav_tiny_gguf_shim.pth"
    # the node packs the tests load as ComfyUI loads custom nodes (ComfyUI-GGUF, ComfyUI-LTXVideo), with
    # their requirements
    bash "$here/.ci/nodepacks.sh" "$host" "$venv" || true
  fi
else
  echo "setup_env: no ComfyUI host at $host (COMFYUI_PATH): host tests will skip" >&2
fi
