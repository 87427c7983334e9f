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
L2="--ckpt /tmp/l2.safetensors --layers 2 --weights fp8 --card-gb 24 --steps 1"
L2B="--ckpt /tmp/l2b.safetensors --layers 2 --weights bf16 --card-gb 24 --steps 1"
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
  value)  # the value in its input's buffer (197bbcb), one card (24 GiB, 8 layers): 8,301 ran out of memory before;
    # the planner checked, then one length past it; 1920x1088 at 1.7 x stock's 993; step time beside stock + chunker
    export LTXAV_PARALLEL_MEMORY_LOG=1
    b v-l8-768 $L8 --frames 8301,8897 --variants parallel-chunker --timeout 130
    LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b v-l8-768-past $L8 --frames 9601 --variants parallel-chunker --timeout 130
    b v-l8-1080p $L8 --res 1920x1088 --frames 1689 --variants parallel-chunker --timeout 120
    b v-l8-5201 $L8 --frames 5201 --variants parallel-chunker,ffn-chunker --timeout 100
    ;;
  issue35)  # two workers (24 GiB each, 768x512) with Ulysses' exchange in place (824a11e) at the planner's edge,
    # one card (8 layers) at 1920x1088 1,681 (the planner refused 1,689 by 0.01 GiB); then the same two past
    # their edges, unchecked. Most important first: a call cut short keeps what ran
    export LTXAV_PARALLEL_MEMORY_LOG=1
    LTXAV_PARALLEL_WORKERS_PER_GPU=2 b w2ip-768 $L2 --gpus 2 --frames 15025 --variants parallel-chunker --timeout 170
    b v-l8-1080p-1681 $L8 --res 1920x1088 --frames 1681 --variants parallel-chunker --timeout 120
    LTXAV_PARALLEL_WORKERS_PER_GPU=2 LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b w2ip-768-past $L2 --gpus 2 --frames 16401 \
      --variants parallel-chunker --timeout 150
    LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b v-l8-1080p-past $L8 --res 1920x1088 --frames 1801 --variants parallel-chunker --timeout 100
    ;;
  # issue 38: W workers sharing one GPU over gloo, each capped at --card-gb (the bench sets LTXAV_PARALLEL_MEMORY_CAP_GIB),
  # the planner checked (a refusal stops the lengths) and then skipped one length further (does it run out of memory?);
  # 2 layers (depth: `workers-2`, 2 against 8 layers at 9,401 frames; 8 against 48 layers: `one-card`);
  # LTXAV_PARALLEL_MEMORY_LOG=1: each worker's phase peaks
  workers-4-h100)  # four workers of 24 GiB each on one GPU, 768x512, the planner's edge (23,489 as for four cards)
    # and the target (>= 18,724) only if the edge failed. On one H100: the caps (24 GiB each, 96 in all) are limits, not
    # reservations, so this fits the H100's 79 GiB while the four peaks together do (2 layers: about 13 GiB each at the
    # edge); an out-of-memory on the whole card (not a worker's cap) shows in the log as the card's, not the cap's
    export LTXAV_PARALLEL_MEMORY_LOG=1 LTXAV_PARALLEL_WORKERS_PER_GPU=4
    b w4-768-edge $L2 --gpus 4 --frames 23489 --variants parallel-chunker --timeout 250
    grep '"kind": "run"' "$out/w4-768-edge.jsonl" 2>/dev/null | grep -q '"ok": true' || \
      b w4-768 $L2 --gpus 4 --frames 18801 --variants parallel-chunker --timeout 180
    ;;
  workers-4-h100-depth)  # the same: 2 against 8 layers at 2,577 frames
    export LTXAV_PARALLEL_MEMORY_LOG=1 LTXAV_PARALLEL_WORKERS_PER_GPU=4
    b w4-depth-l2 $L2 --gpus 4 --frames 2577 --variants parallel-chunker --timeout 60
    b w4-depth-l8 $L8 --gpus 4 --frames 2577 --variants parallel-chunker --timeout 70
    ;;
  workers-4-anchor)  # stock + chunker on one 24 GiB share of the same card, beside workers-4-h100 (its anchor: 5,201)
    LTXAV_PARALLEL_WORKERS_PER_GPU=1 b stock-768-24g $L2 --frames 5201,5601 --variants ffn-chunker --timeout 120
    ;;
  workers-4-16)  # four workers on one H100, 16 GiB each, 768x512: depth (2 against
    # 8 layers), then the planner's edge (12,721); 0.9 x 4 x stock + chunker's 3,001 (10,809) only if the edge failed
    export LTXAV_PARALLEL_MEMORY_LOG=1 LTXAV_PARALLEL_WORKERS_PER_GPU=4
    b w4-16g-depth-l2 $L2 --card-gb 16 --gpus 4 --frames 2577 --variants parallel-chunker --timeout 60
    b w4-16g-depth-l8 $L8 --card-gb 16 --gpus 4 --frames 2577 --variants parallel-chunker --timeout 70
    b w4-16g-768-edge $L2 --card-gb 16 --gpus 4 --frames 12721 --variants parallel-chunker --timeout 200
    grep '"kind": "run"' "$out/w4-16g-768-edge.jsonl" 2>/dev/null | grep -q '"ok": true' || \
      b w4-16g-768 $L2 --card-gb 16 --gpus 4 --frames 10809 --variants parallel-chunker --timeout 170
    ;;
  workers-2-depth)  # two workers (24 GiB each), 768x512 (DEPTH_FRAMES, 5,201): the peak at 2 against 8 layers, same call
    export LTXAV_PARALLEL_MEMORY_LOG=1 LTXAV_PARALLEL_WORKERS_PER_GPU=2
    b w2-depth-l2 $L2 --gpus 2 --frames "${DEPTH_FRAMES:-5201}" --variants parallel-chunker --timeout 60
    b w2-depth-l8 $L8 --gpus 2 --frames "${DEPTH_FRAMES:-5201}" --variants parallel-chunker --timeout 80
    ;;
  workers-2)  # two workers (24 GiB each, then 16): depth, 768x512 to the edge and past it; stock + chunker at 16 GiB
    export LTXAV_PARALLEL_MEMORY_LOG=1 LTXAV_PARALLEL_WORKERS_PER_GPU=2
    b w2-depth-l8 $L8 --gpus 2 --frames 9401 --variants parallel-chunker --timeout 150
    b w2-768 $L2 --gpus 2 --frames 9401,11001,11601 --variants parallel-chunker --timeout 120
    LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b w2-768-past $L2 --gpus 2 --frames 12401 --variants parallel-chunker --timeout 120
    b w2-768-16g $L2 --card-gb 16 --gpus 2 --frames 6401,6801 --variants parallel-chunker --timeout 90
    LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b w2-768-16g-past $L2 --card-gb 16 --gpus 2 --frames 7401 --variants parallel-chunker --timeout 90
    LTXAV_PARALLEL_WORKERS_PER_GPU=1 b stock-768-16g $L2 --card-gb 16 --frames 3001,3201 --variants ffn-chunker --timeout 60
    ;;
  workers-2-1080p)  # two workers (24 GiB each), 1920x1088, and bf16 768x512; stock + chunker 1920x1088, same call
    export LTXAV_PARALLEL_MEMORY_LOG=1 LTXAV_PARALLEL_WORKERS_PER_GPU=2
    b w2-1080p $L2 --res 1920x1088 --gpus 2 --frames 1801,2201 --variants parallel-chunker --timeout 120
    LTXAV_PARALLEL_SKIP_MEMORY_CHECK=1 b w2-1080p-past $L2 --res 1920x1088 --gpus 2 --frames 2401 --variants parallel-chunker --timeout 120
    b w2-768-bf16 $L2B --gpus 2 --frames 11001 --variants parallel-chunker --timeout 120
    LTXAV_PARALLEL_WORKERS_PER_GPU=1 b stock-1080p $L2 --res 1920x1088 --frames 993,1097 --variants ffn-chunker --timeout 60
    ;;
  *) echo "unknown call $call"; exit 2 ;;
esac
tail -n 3 "$out"/*.log | cut -c1-400
# at most 8 files come back from a device call: the logs travel as one archive
(cd "$out" && tar czf "logs-${call}.tgz" ./*.log && rm -f ./*.log)  # named for the call: calls chained into one OUTDIR keep every archive
