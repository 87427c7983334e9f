#!/usr/bin/env bash
# On the GPU machine, from the repository root: `source bench/device_setup.sh`. Installs the carried
# wheels (.carry/wheels, built by ../shared/device/pack.sh) into /tmp/site and the stripped host
# (.carry/host.txz) into /tmp/host, and sets the environment the benchmarks need.
carry=${CARRY_DIR:-.carry}
[ -d /tmp/site/ray ] || bash "$carry/wheels/unpack.sh"
[ -d /tmp/host/ComfyUI ] || { mkdir -p /tmp/host && xz -dc "$carry/host.txz" | tar xf - -C /tmp/host; }
# optional: PyAV unpacked from its wheel (av.txz) and ComfyUI-GGUF into the host's custom_nodes
[ -f "$carry/av.txz" ] && [ ! -d /tmp/site/av ] && xz -dc "$carry/av.txz" | tar xf - -C /tmp/site
for pack in "$carry"/ComfyUI-GGUF-*.tar.xz; do
  [ -f "$pack" ] && [ ! -d /tmp/host/ComfyUI/custom_nodes/ComfyUI-GGUF ] && tar xJf "$pack" -C /tmp/host/ComfyUI/custom_nodes
done
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export COMFYUI_PATH=/tmp/host/ComfyUI
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PATH=/tmp/site/bin:$PATH
