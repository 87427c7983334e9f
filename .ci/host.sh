#!/usr/bin/env bash
# Print the ComfyUI host the tests use, unpacking it first when needed:
#   1. $COMFYUI_PATH when set (it must hold ComfyUI with LTXAV: comfy/ldm/lightricks/av_model.py);
#   2. /opt/ComfyUI when it holds one;
#   3. else ../shared/host/ComfyUI-*.tar.xz (beside the checkout), unpacked once into a cache outside the
#      repository: ${LTXAV_HOST_CACHE:-$XDG_CACHE_HOME/ltxav-pack or ~/.cache/ltxav-pack}/<archive name>/ComfyUI.
# Exits non-zero, saying why, when none of these gives a host.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
marker=comfy/ldm/lightricks/av_model.py

if [ -n "${COMFYUI_PATH:-}" ]; then
  if [ -f "$COMFYUI_PATH/$marker" ]; then echo "$COMFYUI_PATH"; exit 0; fi
  echo "host.sh: COMFYUI_PATH=$COMFYUI_PATH holds no ComfyUI with LTXAV ($marker missing); point it at a" \
       "ComfyUI 0.20.1 checkout, or unset it to use /opt/ComfyUI or ../shared/host" >&2
  exit 1
fi
if [ -f "/opt/ComfyUI/$marker" ]; then echo /opt/ComfyUI; exit 0; fi

archive=$(ls "$here"/../shared/host/ComfyUI-*.tar.xz 2>/dev/null | sort | tail -n 1 || true)
if [ -z "$archive" ]; then
  echo "host.sh: no ComfyUI host: COMFYUI_PATH is unset, /opt/ComfyUI has none, and there is no" \
       "../shared/host/ComfyUI-*.tar.xz beside the checkout; set COMFYUI_PATH to a ComfyUI 0.20.1 checkout" >&2
  exit 1
fi
cache=${LTXAV_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ltxav-pack}/$(basename "$archive" .tar.xz)
if [ ! -f "$cache/ComfyUI/$marker" ]; then
  rm -rf "$cache.tmp" && mkdir -p "$cache.tmp"
  tar -xJf "$archive" -C "$cache.tmp"
  [ -f "$cache.tmp/ComfyUI/$marker" ] || { echo "host.sh: $archive holds no ComfyUI/$marker" >&2; exit 1; }
  rm -rf "$cache" && mv "$cache.tmp" "$cache"
  echo "host.sh: unpacked $(basename "$archive") into $cache" >&2
fi
echo "$cache/ComfyUI"
