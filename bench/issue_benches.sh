#!/usr/bin/env bash
# The one-GPU benches of issues 33 (GGUF), 34 (two stages with a LoRA) and 37 (a long clip to a file) on a
# `device` machine, from the repository root:
#   COMMIT=<sha> bash bench/issue_benches.sh CALL[,CALL...] OUTDIR
#   (CALL: gguf, gguf-workers, gguf-speed, save, save-fidelity, save-1080p, save-1080p-node, save-long, save-workers,
#   save-workers-897, save-workers-5201, save-workers-warm, save-workers-cold-warm, save-stock-5201, lora)
# CALL picks one set of runs (each fits one 10-minute call; every run has its own time limit, most
# important first); results go to OUTDIR as JSON lines, logs as one archive (a call returns 8 files at most).
# Needs the carry with PyAV, gguf and ComfyUI-GGUF (bench/README.md, top).
set -uo pipefail
calls=${1:?call}; out=${2:?outdir}
mkdir -p "$out"
source bench/device_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
c="--commit ${COMMIT:-unknown}"
r() { local name=$1 limit=$2; shift 2; timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "$name rc=$?" >> "$out/rc.txt"; }
GG="--gguf Q8_0 --layers 48 --card-gb 80 --frames 897"  # the GGUF runs' model and clip (the whole card)
# the save node on two workers sharing the GPU: w2save NAME LIMIT FRAMES TIMEOUT [ARGS]
w2save() { local name=$1 limit=$2 frames=$3 timeout=$4; shift 4
  LTXAV_PARALLEL_WORKERS_PER_GPU=2 r "$name" "$limit" python bench/save_video.py --card-gb 24 $c --frames "$frames" \
    --variants node-workers --gpus 2 --timeout "$timeout" --out "$out/save-workers.jsonl" "$@"; }
for call in ${calls//,/ }; do
case $call in
  gguf)  # 48-layer GGUF Q8_0 through ComfyUI-GGUF's loader: stock beside the node at gpus=1, then two workers
    # (at 8 steps they passed the 280-s limit on an H100, 2026-12-07: gguf-workers runs 2)
    G="$GG --steps 8 --variants stock,parallel"
    r gguf-gpus1 280 python bench/comfy_long_video.py $G --gpus 1 --timeout 200 $c --out "$out/gguf-gpus1.jsonl"
    LTXAV_PARALLEL_WORKERS_PER_GPU=2 r gguf-2workers 280 python bench/comfy_long_video.py $G --gpus 2 --timeout 220 \
      $c --out "$out/gguf-2workers.jsonl"
    ;;
  gguf-workers)  # two workers at 2 steps, beside stock: at 8 steps two workers passed 280 s (2026-12-07; gloo copies
    # every exchange through host memory, 48 layers a step)
    LTXAV_PARALLEL_WORKERS_PER_GPU=2 r gguf-2workers-2steps 330 python bench/comfy_long_video.py $GG --steps 2 \
      --variants stock,parallel --gpus 2 --timeout 300 $c --out "$out/gguf-2workers-2steps.jsonl"
    ;;
  gguf-speed)  # gpus=1 took 13 % longer a step than stock on GGUF (2026-12-07): the same beside the lean attention off
    G="$GG --steps 4 --gpus 1 --timeout 200 $c"
    r gguf-speed 250 python bench/comfy_long_video.py $G --variants stock,parallel --out "$out/gguf-speed.jsonl"
    LTXAV_PARALLEL_LEAN_ATTENTION=0 r gguf-speed-not-lean 120 python bench/comfy_long_video.py $G --variants parallel \
      --out "$out/gguf-speed-not-lean.jsonl"
    ;;
  save)  # decode + save against stock's chain on an emulated 24 GiB card, growing lengths
    S="python bench/save_video.py --card-gb 24 $c --out $out/save.jsonl"
    r save-897 200 $S --frames 897 --variants stock,node,node-tiled --timeout 90
    r save-5201 230 $S --frames 5201 --variants node --timeout 220
    ;;
  save-fidelity)  # 897 frames: stock's chain and the node with the templates' tiles (bf16 VAE), each against the
    # float32 VAE's frames (2026-12-07: the node's frames were up to 6 levels from stock's on 48 % of values)
    r save-fidelity 330 python bench/save_video.py --card-gb 24 $c --out "$out/save-fidelity.jsonl" --frames 897 \
      --variants reference,stock,node-tiled --timeout 150
    ;;
  save-1080p)  # 993 frames at 1920x1088: stock's chain took more than 100 s on an H100 (2026-12-07)
    r save-1080p 570 python bench/save_video.py --card-gb 24 $c --out "$out/save-1080p.jsonl" --frames 993 \
      --res 1920x1088 --variants stock,node --timeout 270
    ;;
  save-1080p-node)  # the node alone at 993 frames 1920x1088 (stock's chain beside it: save-1080p, 2026-12-07)
    r save-1080p-node 220 python bench/save_video.py --card-gb 24 $c --out "$out/save-1080p-node.jsonl" --frames 993 \
      --res 1920x1088 --variants node --timeout 200
    ;;
  save-long)  # stock's chain and the node at 2,577 frames, the node at 5,201 with the templates' tiles
    S="python bench/save_video.py --card-gb 24 $c --out $out/save-long.jsonl"
    r save-2577 330 $S --frames 2577 --variants stock,node --timeout 160
    r save-5201-tiled 240 $S --frames 5201 --variants node-tiled --timeout 230
    ;;
  save-stock-5201)  # stock's chain at 5,201 frames (the templates' tiles): 134 s and 34 GiB of host memory at 2,577
    # (2026-12-07); about twice that here, on a machine of 128 GiB
    r save-stock-5201 560 python bench/save_video.py --card-gb 24 $c --out "$out/save-stock-5201.jsonl" --frames 5201 \
      --variants stock --timeout 540
    ;;
  save-workers)  # the node's decode on two workers sharing the GPU
    w2save save-workers 560 897,5201 270
    ;;
  save-workers-897)  # the same at 897 frames only
    w2save save-workers-897 250 897 230
    ;;
  save-workers-5201)  # the same at 5,201 frames only (the parts sent in segments, spooled to disk: 046d61c)
    w2save save-workers-5201 300 5201 280
    ;;
  save-workers-warm)  # 5,201 frames on two workers after a first save of 97 frames (what a second prompt finds; the
    # first save is save-workers-5201), then that with glibc's mmap threshold fixed at 64 KiB in every process
    # (Ray's processes inherit it)
    w2save save-workers-5201-warm 170 5201 160 --warm-frames 97
    MALLOC_MMAP_THRESHOLD_=65536 w2save save-workers-5201-warm-mmap64k 170 5201 160 --warm-frames 97
    ;;
  save-workers-cold-warm)  # the first save in fresh workers and a later one, in one call on one machine: what a
    # first decode loads once (each part's phases: parts[].anon_gib; ComfyUI's process: host_anon_timeline_gib)
    w2save save-workers-5201 270 5201 250
    w2save save-workers-5201-warm 290 5201 270 --warm-frames 97  # 160 s timed out once (ec8f040: setup 41 s)
    ;;
  lora)  # the LTX-2.3 template's two stages with a rank-64 LoRA: stock, gpus=1, two workers; then before the fix
    # (one prompt: its two stages show the re-patch). Two workers took 136 s for four stages on an H100 (2026-12-07)
    L="python bench/two_stage_lora.py --layers 48 --weights fp8 --rank 64 $c"
    r lora 430 $L --variants stock,gpus1,shared2 --timeout 180 --profile --out "$out/lora.jsonl"
    r lora-before-fix 140 $L --variants shared2 --before-fix --prompts 1 --timeout 130 --out "$out/lora-before-fix.jsonl"
    ;;
  *) echo "unknown call $call"; exit 2 ;;
esac
done
cat "$out/rc.txt"; tail -n 4 "$out"/*.log | cut -c1-400
(cd "$out" && tar czf "logs-${calls//,/-}.tgz" ./*.log && rm -f ./*.log)  # named for the calls: calls chained into one OUTDIR keep every archive
