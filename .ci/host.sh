#!/usr/bin/env bash
# Print the ComfyUI host the pack's set-up, demo and tests use, unpacking or fetching it first when needed:
#   1. $COMFYUI_PATH when set (it must hold ComfyUI with LTXAV: comfy/ldm/lightricks/av_model.py);
#   2. the ComfyUI this folder sits in (ComfyUI/custom_nodes/<this pack>: the install layout);
#   3. ${LTXAV_SYSTEM_COMFYUI:-/opt/ComfyUI} when it holds one;
#   4. else ../shared/host/ComfyUI-*.tar.xz (beside the checkout), unpacked once into a cache outside the
#      repository: ${LTXAV_HOST_CACHE:-$XDG_CACHE_HOME/ltxav-pack or ~/.cache/ltxav-pack}/<archive name>/ComfyUI;
#   5. else, only with LTXAV_FETCH_COMFYUI=1: git clone ${LTXAV_COMFYUI_GIT:-https://github.com/comfyanonymous/ComfyUI}
#      at ${LTXAV_COMFYUI_REF:-v0.20.1} into that cache (ComfyUI is not on PyPI).
# --dry-run: print the folder it would use, unpacking and fetching nothing.
# Exits non-zero, saying why, when none of these gives a host.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
marker=comfy/ldm/lightricks/av_model.py
dry=false
[ "${1:-}" = --dry-run ] && dry=true
cache_root=${LTXAV_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ltxav-pack}

if [ -n "${COMFYUI_PATH:-}" ]; then
  if [ -f "$COMFYUI_PATH/$marker" ]; then echo "$COMFYUI_PATH"; exit 0; fi
  echo "host.sh: COMFYUI_PATH=$COMFYUI_PATH holds no ComfyUI with LTXAV ($marker missing); point it at a" \
       "ComfyUI 0.20.1 checkout, or unset it" >&2
  exit 1
fi
parent=$(dirname "$here")
if [ "$(basename "$parent")" = custom_nodes ] && [ -f "$(dirname "$parent")/main.py" ]; then
  enclosing=$(dirname "$parent")
  if [ -f "$enclosing/$marker" ]; then echo "$enclosing"; exit 0; fi
  echo "host.sh: the ComfyUI this pack sits in ($enclosing) has no LTX-2 audio-video ($marker missing):" \
       "update it to ComfyUI 0.20.1 or newer, or set COMFYUI_PATH to one that has it" >&2
  exit 1
fi
system=${LTXAV_SYSTEM_COMFYUI:-/opt/ComfyUI}
if [ -f "$system/$marker" ]; then echo "$system"; exit 0; fi

archive=$(ls "$here"/../shared/host/ComfyUI-*.tar.xz 2>/dev/null | sort | tail -n 1 || true)
if [ -n "$archive" ]; then
  cache=$cache_root/$(basename "$archive" .tar.xz)
  if [ ! -f "$cache/ComfyUI/$marker" ] && ! $dry; then
    rm -rf "$cache.tmp" && mkdir -p "$cache.tmp"
    tar -xJf "$archive" -C "$cache.tmp"
    [ -f "$cache.tmp/ComfyUI/$marker" ] || { echo "host.sh: $archive holds no ComfyUI/$marker" >&2; exit 1; }
    rm -rf "$cache" && mv "$cache.tmp" "$cache"
    echo "host.sh: unpacked $(basename "$archive") into $cache" >&2
  fi
  echo "$cache/ComfyUI"
  exit 0
fi

if [ "${LTXAV_FETCH_COMFYUI:-}" = 1 ]; then
  url=${LTXAV_COMFYUI_GIT:-https://github.com/comfyanonymous/ComfyUI}
  ref=${LTXAV_COMFYUI_REF:-v0.20.1}
  cache=$cache_root/ComfyUI-git-$ref
  if [ ! -f "$cache/ComfyUI/$marker" ] && ! $dry; then
    command -v git >/dev/null || { echo "host.sh: LTXAV_FETCH_COMFYUI=1 needs git" >&2; exit 1; }
    rm -rf "$cache.tmp" && mkdir -p "$cache.tmp"
    git clone -q --depth 1 --branch "$ref" "$url" "$cache.tmp/ComfyUI" >&2 \
      || { echo "host.sh: could not clone $url at $ref" >&2; exit 1; }
    [ -f "$cache.tmp/ComfyUI/$marker" ] || { echo "host.sh: $url at $ref has no $marker (LTXAV needs ComfyUI" \
                                                 "0.20.1 or newer)" >&2; exit 1; }
    rm -rf "$cache" && mv "$cache.tmp" "$cache"
    echo "host.sh: cloned ComfyUI $ref from $url into $cache" >&2
  fi
  echo "$cache/ComfyUI"
  exit 0
fi
echo "host.sh: no ComfyUI host: COMFYUI_PATH is unset, this pack is not in a ComfyUI's custom_nodes, $system" \
     "has none, and there is no ../shared/host/ComfyUI-*.tar.xz beside the checkout; set COMFYUI_PATH to a" \
     "ComfyUI 0.20.1 checkout, or set LTXAV_FETCH_COMFYUI=1 to clone it with git" >&2
exit 1
