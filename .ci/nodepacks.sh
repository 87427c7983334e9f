#!/usr/bin/env bash
# Install the node packs the tests load (../shared/nodepacks/<pack>-<commit>.tar.xz: ComfyUI-GGUF,
# ComfyUI-LTXVideo) into the test host's custom_nodes, and their requirements into the test venv
# (tests/helpers/node_packs.py loads them as ComfyUI loads custom nodes). Each archive is unpacked once per
# commit (a stamp in its folder), its requirements installed once per venv (a stamp in the venv), under the
# set-up's constraints (requirements-test.txt already pins what a pack's own list leaves open: kornia).
# Usage: nodepacks.sh HOST VENV. Exits non-zero, saying why, when there are no archives beside the checkout.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
host=$1
venv=$2
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
  if [ ! -f "$target/.unpacked-$name" ]; then
    rm -rf "$target.tmp" && mkdir -p "$target.tmp"
    tar -xJf "$archive" -C "$target.tmp"
    [ -f "$target.tmp/$folder/__init__.py" ] || { echo "nodepacks.sh: $archive holds no $folder/__init__.py" >&2; exit 1; }
    rm -rf "$target" && mv "$target.tmp/$folder" "$target" && rm -rf "$target.tmp"
    touch "$target/.unpacked-$name"
    echo "nodepacks.sh: installed $name into $host/custom_nodes" >&2
  fi
  if [ -f "$target/requirements.txt" ] && [ ! -f "$venv/.nodepack-requirements-$name" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$target/requirements.txt" \
      -c "$here/.ci/constraints.txt"
    touch "$venv/.nodepack-requirements-$name"
  fi
done
