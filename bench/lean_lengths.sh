#!/usr/bin/env bash
# The GPU runs of the lean attention (issue 35, 38) on a `device` machine, from the repository root:
#   bash bench/lean_lengths.sh CALL OUTDIR
# CALL picks one set of runs (each fits one 10-minute call); results go to OUTDIR as JSON lines + logs.
# Needs the carry (.carry: bench/README.md, top) and one GPU; 24 GiB cards are emulated.
set -uo pipefail
call=${1:?call}; out=${2:?outdir}
mkdir -p "$out"
source bench/device_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
b() { local name=$1; shift; python bench/comfy_long_video.py "$@" --commit "${COMMIT:-unknown}" --out "$out/$name.jsonl" > "$out/$name.log" 2>&1; }
L48="--ckpt /tmp/l48.safetensors --layers 48 --weights fp8 --card-gb 24 --steps 1"
L8="--ckpt /tmp/l8.safetensors --layers 8 --weights fp8 --card-gb 24 --steps 1"
case $call in
  one-card)  # 48 layers at 5,201 frames: the pack (gpus=1, lean) beside stock + chunker, same clip; 8 layers: depth
    b l48-5201 $L48 --frames 5201 --variants parallel-chunker,ffn-chunker --timeout 220
    b l8-5201 $L8 --frames 5201 --variants parallel-chunker,ffn-chunker --timeout 120
    LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b l8-long $L8 --frames 8301,9401,10601 --variants parallel-chunker --timeout 150
    ;;
  one-card-long)  # 8 layers (the peak does not depend on depth: one-card, same run); the planner skipped
    b l8-5201 $L8 --frames 5201 --variants parallel-chunker --timeout 120
    LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b l8-long $L8 --frames 8301,9401,10601 --variants parallel-chunker --timeout 150
    LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b l8-1080p $L8 --res 1920x1088 --frames 1601,1801 --variants parallel-chunker --timeout 150
    ;;
  snapshot)  # where the memory is at the one-card edge: live blocks at 8,301 frames (8 layers)
    BENCH_MEMORY_SNAPSHOT=1 LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b snap-8301 $L8 --no-cuda-malloc --frames 8301 --variants parallel-chunker --timeout 150
    ;;
  last)  # the one-card ceiling between 5,201 and 8,301, and two workers sharing the GPU (24 GiB each), 8 layers
    LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b l8-7401 $L8 --frames 7401,7801 --variants parallel-chunker --timeout 100
    [ -n "${W2:-}" ] && LTXAV_PARALLEL_WORKERS_PER_GPU=2 LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b w2-l8-11001 $L8 --gpus 2 --frames 11001 --variants parallel-chunker --timeout 300
    ;;
  workers-2)  # issue 38: two workers sharing one H100 (24 GiB each, gloo), 8 layers, the planner checked
    LTXAV_PARALLEL_WORKERS_PER_GPU=2 b w2-768 $L8 --gpus 2 --frames 9401,11001,12601 --variants parallel-chunker --timeout 280
    LTXAV_PARALLEL_WORKERS_PER_GPU=2 LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b w2-768-past $L8 --gpus 2 --frames 13401 --variants parallel-chunker --timeout 280
    ;;
  workers-4)  # issue 38: four workers sharing one H200 (24 GiB each), 8 layers
    LTXAV_PARALLEL_WORKERS_PER_GPU=4 b w4-768 $L8 --gpus 4 --frames 14401,18001 --variants parallel-chunker --timeout 280
    ;;
  *) echo "unknown call $call"; exit 2 ;;
esac
tail -n 3 "$out"/*.log | cut -c1-400
