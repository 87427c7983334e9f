"""The longest LTX-2 video whose forward fits 24 GB per GPU, for W = 1, 2, 4: all 48 layers, fp8
weights (random), the pack's sequence-parallel forward and FFN chunking, and the memory planner's
prediction for every run.

Usage: python bench/long_video.py --comfy PATH [--worlds 1,2,4] [--res 768x512] [--cap-gb 24]
          [--layers 48] [--weights fp8_e4m3fn] [--steps 0.92,0.96,1,1.04,1.08,1.12,1.16,1.2]
          [--gpus N] [--run-blocks N] [--profile] [--out result.json]
Each GPU's PyTorch allocator is capped at --cap-gb (10^9 bytes, ``set_per_process_memory_fraction``;
24 GB leaves a 24 GiB card ~1.6 GiB for the CUDA context and NCCL). Per W, one process per GPU
builds the model (ComfyUI's LTXAVModel with the operations ComfyUI picks for fp8 weights, bf16
compute) and runs one forward per length, in ascending order: the planner's largest length times
each --steps factor, until a length runs out of memory (that process group is then killed). Each
run records per-rank peak memory (allocator, weights included), its PE and blocks phases, the
forward time and the planner's estimate. --profile: rank 0 records allocation history and lists
what was live at its peak (or at the out-of-memory), grouped by the ComfyUI / pack line that
allocated it. --gpus N (default: all visible) with W > N puts W/N ranks on each GPU, each capped at
--cap-gb, and runs the collectives over gloo (NCCL refuses two ranks on one GPU): the per-rank
memory is what W GPUs would each hold; the forward time is not W GPUs' time. --run-blocks N: all
--layers blocks are built and stay resident, the forward runs the first N (every block has the same
shapes, so its peak is the same; the forward is N/layers as long).
"""
import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp32": torch.float32}


def planner():
    common.import_pack()
    from ltxav_pack import memory_plan

    return memory_plan


def ltxav():
    """The LTXAV family (its planner numbers and latent geometry)."""
    common.import_pack()
    from ltxav_pack.models.ltxav import LTXAV

    return LTXAV()


def plan_dims(a, device="meta"):
    """The planner's view of the benchmark model (built on the meta device: no memory)."""
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = common.build_model(a.layers, tiny=a.tiny, dtype=compute, device=torch.device(device),
                               weight_dtype=DTYPES[a.weights])
    return ltxav().plan_dims(model, compute_dtype=compute)


def profile_at_peak(snapshot, device, top=14):
    """Allocations live at the peak of the recorded history, summed per allocating ComfyUI/pack line."""
    trace = snapshot["device_traces"][device]
    live, cur, best, best_i = {}, 0, -1, -1
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            cur += ev["size"]
            if cur > best:
                best, best_i = cur, i
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])
        elif ev["action"] == "oom":
            best, best_i = cur, i
            break
    live = {}
    for ev in trace[:best_i + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
    sites = {}
    for ev in live.values():
        site = "?"
        for f in ev.get("frames", []):
            name = f["filename"]
            if "/comfy/" in name or "ltxav_pack" in name or "/bench/" in name or name.endswith(
                    ("xdit_context_parallel.py", "ffn_chunking.py")):
                site = f"{name.split('/')[-1]}:{f['line']} {f['name']}"
                break
        size, count = sites.get(site, (0, 0))
        sites[site] = (size + ev["size"], count + 1)
    rows = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(live_above_history_start_gb=round(best / common.GB, 3),
                sites=[dict(site=s, gb=round(b / common.GB, 3), tensors=n) for s, (b, n) in rows])


def backend(world, a):
    if not torch.cuda.is_available():
        return "gloo"
    return "nccl" if world <= a.gpus else "gloo"


def rank_main(rank, world, a, latent_frames, init_file, out_dir):
    out = Path(out_dir)
    on_gpu = torch.cuda.is_available()
    try:
        gpu = rank % a.gpus
        if on_gpu:
            torch.cuda.set_device(gpu)
            total = torch.cuda.get_device_properties(gpu).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gb * 1e9 / total))
        else:
            torch.set_num_threads(1)
        common.import_comfy(a.comfy)
        import comfy.patcher_extension

        mp = planner()
        from ltxav_pack import ffn_chunking
        from ltxav_pack import xdit_context_parallel as xsp
        from ltxav_pack.sequence_parallel import groups

        dmw = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
        to = {"wrappers": {dmw: {"ffn": [ffn_chunking.diffusion_model_wrapper]}},
              ffn_chunking.CHUNKING_KEY: ffn_chunking.ChunkSettings(1, True).as_dict()}
        sp = None
        if world > 1:
            groups.init_process_groups(rank, world, groups.Degrees(world, 1), backend(world, a), f"file://{init_file}")
            sp = xsp.SequenceParallel(phase_stats=True)
            to["wrappers"][dmw]["sp"] = [sp.wrapper]
        compute = torch.bfloat16 if on_gpu else torch.float32
        dev = torch.device("cuda", gpu) if on_gpu else torch.device("cpu")
        model = common.build_model(a.layers, tiny=a.tiny, dtype=compute, device=dev, weight_dtype=DTYPES[a.weights])
        dims = ltxav().plan_dims(model, compute_dtype=compute)
        resident = list(model.transformer_blocks)  # noqa: F841 - the blocks not run stay in memory
        if a.run_blocks:
            model.transformer_blocks = torch.nn.ModuleList(resident[:a.run_blocks])
        weights = torch.cuda.memory_allocated() if on_gpu else 0
        w, h = (int(v) for v in a.res.split("x"))
        for lf in latent_frames:
            frames = (lf - 1) * 8 + 1
            inputs, tokens = common.make_inputs(model, f"{frames}x{w}x{h}", dtype=compute)
            clip = mp.Clip(lf, h // 32, w // 32, inputs["x"][1].shape[2])
            est = mp.estimate(dims, clip, world=world)
            row = dict(rank=rank, world=world, ring=1, gpus=min(world, a.gpus), backend=backend(world, a),
                       run_blocks=a.run_blocks or a.layers, frames=frames, latent_frames=lf, video_tokens=tokens,
                       clip=dict(latent_frames=lf, latent_height=h // 32, latent_width=w // 32,
                                 audio_tokens=clip.audio_tokens),
                       plan_dims={k: getattr(dims, k) for k in ("video_dim", "audio_dim", "ffn_mult", "weight_bytes",
                                                                "cast_bytes", "compute_bytes")},
                       planned_gb=round(est.total / common.GB, 3),
                       planned_parts_gb={k: round(v / common.GB, 3) for k, v in est.parts.items()},
                       weights_gb=round(weights / common.GB, 3))
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                if a.profile and rank == 0:
                    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
            if sp:
                sp.reset()
            base = torch.cuda.memory_allocated() if on_gpu else 0
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    y = model(**inputs, transformer_options=to)
                    ok = bool(torch.isfinite(y[0]).all())
                    del y
                if on_gpu:
                    torch.cuda.synchronize()
                row.update(ok=True, finite=ok, forward_s=round(time.perf_counter() - t0, 2))
            except torch.OutOfMemoryError as e:
                row.update(ok=False, error=str(e).splitlines()[0][:300])
            if on_gpu:
                # the sequence-parallel phase stats reset the allocator's peak per phase: their peaks
                # (above the forward's start) are the forward's
                peak = max(torch.cuda.max_memory_allocated(), base + (sp.stats.get("peak", 0) if sp else 0))
                row["peak_gb"] = round(peak / common.GB, 3)
                if sp:
                    row["phases_gb"] = {k: round(v / common.GB, 3) for k, v in sp.stats.items()}
                if a.profile and rank == 0:
                    row["profile"] = profile_at_peak(torch.cuda.memory._snapshot(), gpu)
                    torch.cuda.memory._record_memory_history(enabled=None)
            (out / f"r{rank}-{lf}.json").write_text(json.dumps(row))
            del inputs
            if not row["ok"]:
                break
    except Exception:  # noqa: BLE001 - reported to the parent
        (out / f"r{rank}-crash.json").write_text(json.dumps(dict(rank=rank, crash=traceback.format_exc()[-3000:])))
    (out / f"r{rank}-done").write_text("")
    os._exit(0)  # a peer may still wait in a collective: do not run NCCL's teardown


def run_world(world, a, latent_frames, tmp, timeout):
    """One process group running ``latent_frames`` in order; returns one row per length (all ranks)."""
    out = Path(tmp) / f"w{world}"
    out.mkdir()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, world, a, latent_frames, str(out / "init"), str(out)))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    while time.time() < deadline:
        failed = [f for f in out.glob("r*-*.json") if '"ok": false' in f.read_text() or "crash" in f.name]
        if all((out / f"r{r}-done").exists() for r in range(world)) or failed:
            time.sleep(3 if failed else 0)  # let the other ranks write theirs
            break
        time.sleep(1)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    rows = []
    for f in sorted(out.glob("r*-crash.json")):
        rows.append(json.loads(f.read_text()))
    for lf in latent_frames:
        per_rank = [json.loads(f.read_text()) for f in sorted(out.glob(f"r*-{lf}.json"))]
        if not per_rank:
            continue
        first = per_rank[0]
        row = {k: v for k, v in first.items() if k not in ("rank", "peak_gb", "phases_gb",
                                                           "profile", "ok", "error", "forward_s", "finite")}
        row.update(ok=len(per_rank) == world and all(r["ok"] for r in per_rank),
                   per_rank_peak_gb=[r.get("peak_gb") for r in per_rank],
                   per_rank_phases_gb=[r.get("phases_gb") for r in per_rank],
                   forward_s=max((r.get("forward_s") or 0) for r in per_rank),
                   finite=all(r.get("finite", True) for r in per_rank),
                   errors=[r["error"] for r in per_rank if r.get("error")],
                   profile=next((r["profile"] for r in per_rank if r.get("profile")), None))
        peak = max((p or 0) for p in row["per_rank_peak_gb"])
        row["plan_error_pct"] = round((row["planned_gb"] - peak) / peak * 100, 1) if row["ok"] and peak else None
        rows.append(row)
        if not row["ok"]:
            break
    return rows


def main():
    common.multicast_off()
    # fewer fragmented blocks near the cap; before CUDA starts, and the spawned ranks inherit it
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--res", default="768x512")
    ap.add_argument("--cap-gb", type=float, default=24.0)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--weights", default="fp8_e4m3fn", choices=sorted(DTYPES))
    ap.add_argument("--steps", default="0.92,0.96,1,1.04,1.08,1.12,1.16,1.2")
    ap.add_argument("--timeout", type=float, default=480)
    ap.add_argument("--gpus", type=int, default=max(1, torch.cuda.device_count()))
    ap.add_argument("--run-blocks", type=int, default=0, help="run only the first N blocks (0: all)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny dims on CPU (gloo): a smoke run")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    common.import_comfy(a.comfy)
    mp = planner()
    dims = plan_dims(a)
    w, h = (int(v) for v in a.res.split("x"))
    info = common.device_info()
    command = "python bench/long_video.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k not in ("comfy", "out") and v is not False)
    result = dict(bench="long_video", res=a.res, layers=a.layers, weights=a.weights, cap_gb=a.cap_gb, gpus=a.gpus,
                  **info, command=command, plan_weights_gb=round(dims.weight_bytes / common.GB, 3), worlds={}, tries=[])
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(x) for x in a.worlds.split(",")):
            clip = ltxav().geometry.clip(121, w, h)
            predicted = mp.largest_latent_frames(int(a.cap_gb * 1e9), dims, clip, world=world)
            lengths = sorted({max(2, round(predicted * float(s))) for s in a.steps.split(",")})
            t0 = time.perf_counter()
            rows = run_world(world, a, lengths, tmp, a.timeout)
            ok = [r for r in rows if r.get("ok")]
            best = max(ok, key=lambda r: r["latent_frames"]) if ok else None
            failed = next((r for r in rows if r.get("ok") is False), None)
            summary = dict(world=world, planned_max_frames=(predicted - 1) * 8 + 1,
                           max_frames=best and best["frames"], max_video_tokens=best and best["video_tokens"],
                           first_failing_frames=failed and failed["frames"],
                           tried=[(r.get("frames"), r.get("ok")) for r in rows],
                           crashed=[r["crash"] for r in rows if "crash" in r], run_s=round(time.perf_counter() - t0, 1))
            result["worlds"][str(world)] = summary
            result["tries"] += [r for r in rows if "crash" not in r]
            print(json.dumps(summary), flush=True)
    print(f"{'W':>2} {'frames':>7} {'tokens':>7} {'ok':>5} {'peak GB':>8} {'plan GB':>8} {'err%':>6} {'fwd s':>6}")
    for r in result["tries"]:
        print(f"{r['world']:>2} {r['frames']:>7} {r['video_tokens']:>7} {r['ok']!s:>5} "
              f"{max((p or 0) for p in r['per_rank_peak_gb']):>8} {r['planned_gb']:>8} {r['plan_error_pct']!s:>6} "
              f"{r['forward_s']:>6}")
    if a.out:
        common.write_json(a.out, result)


if __name__ == "__main__":
    main()
