#!/usr/bin/env bash
# Install the node packs the tests load (../shared/nodepacks/*.tar.xz: ComfyUI-GGUF, ComfyUI-LTXVideo) into
# the test host's custom_nodes, each unpacked once (a folder already there is kept). Usage: nodepacks.sh HOST.
# Exits non-zero, saying why, when there are no archives beside the checkout.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
host=$1
shopt -s nullglob
archives=("$here"/../shared/nodepacks/*.tar.xz)
if [ ${#archives[@]} -eq 0 ]; then
  echo "nodepacks.sh: no ../shared/nodepacks/*.tar.xz beside the checkout: the node-pack tests will skip" >&2
  exit 1
fi
for archive in "${archives[@]}"; do
  name=$(basename "$archive" .tar.xz)  # e.g. ComfyUI-GGUF-795e451: the folder is the name without its commit
  folder=${name%-*}
  target=$host/custom_nodes/$folder
  [ -f "$target/__init__.py" ] && continue
  rm -rf "$target.tmp" && mkdir -p "$target.tmp"
  tar -xJf "$archive" -C "$target.tmp"
  [ -f "$target.tmp/$folder/__init__.py" ] || { echo "nodepacks.sh: $archive holds no $folder/__init__.py" >&2; exit 1; }
  rm -rf "$target" && mv "$target.tmp/$folder" "$target" && rm -rf "$target.tmp"
  echo "nodepacks.sh: installed $name into $host/custom_nodes" >&2
done
