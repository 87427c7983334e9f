"""Seconds per step and per-worker peak memory of the parallel sampler (Ray workers) for W = 1, 2, 4,
against ComfyUI's stock sampler on one GPU, at real LTX-2 dims (random weights, a few layers), plus
the fault and steady-memory checks on GPU.

Usage: python bench/ray_sampler.py --comfy PATH [--layers 4] [--case 897x768x512] [--worlds 2,4]
          [--steps 8,20] [--prompts 10] [--speed-only] [--trace DIR] [--out results.jsonl]
Writes a random-weight LTXAV checkpoint (real key names, config in metadata), loads it with
ComfyUI's loader, samples it with comfy.sample.sample on GPU 0 (W=1, stock), then with the pack's
ParallelSampler for each W. Every configuration runs at two step counts: seconds per step is the
slope between them and the per-prompt overhead the rest; the median step (time between ComfyUI's
step callbacks, the first step left out) is reported for the stock sampler and the workers alike.
--trace: two more runs per W by fresh workers tracing them; the second's traces, summarised (GPU busy / idle
per step, host-blocking CUDA calls, longest idle gaps). On the largest W: --prompts prompts in a row with
each worker process's GPU memory (nvidia-smi, per process) after the first and the last; a real
out-of-memory (workers capped just above the weights, the planner's check skipped); the planner's
refusal; and a worker killed mid-run.
"""
import argparse
import bisect
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def gpu_used_mb():
    if not torch.cuda.is_available():
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def process_used_mb(pids):
    """GPU memory nvidia-smi reports for each of ``pids`` (MB; 0 for a process it does not list)."""
    if not torch.cuda.is_available():
        return []
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    used = {}
    for line in out.splitlines():
        pid, mb = (int(x) for x in line.split(","))
        used[pid] = used.get(pid, 0) + mb
    return [used.get(p, 0) for p in pids]


SYNCS = ("Synchronize", "Memcpy", "cudaFree", "cudaMalloc", "cudaHostAlloc")


def trace_summary(path, steps):
    """A worker's Chrome trace, per step: GPU time by kernel kind, busy and idle time between the
    first and the last kernel, the CUDA calls that can block the host (count, seconds), and the
    longest idle gaps with the kernel that ended each, whether its launch came after the gap began
    (the host was late) or before (the GPU waited on something else), and the longest host-blocking
    call during the gap."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                     key=lambda e: e["ts"])
    if not kernels:
        return {"file": Path(path).name, "kernels": 0}
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e]
    launch_ts = {e["args"]["correlation"]: e["ts"] for e in runtime if "correlation" in e.get("args", {})}
    by_kind = {}
    for e in kernels:
        kind = common.kind_of(e["name"])
        by_kind[kind] = by_kind.get(kind, 0.0) + e["dur"] / 1e6
    busy = common.union_s([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    span = (max(e["ts"] + e["dur"] for e in kernels) - kernels[0]["ts"]) / 1e6
    blocking = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in runtime if any(k in e["name"] for k in SYNCS))
    syncs = {}
    for lo, hi, name in blocking:
        n, t = syncs.get(name, (0, 0.0))
        syncs[name] = (n + 1, t + (hi - lo) / 1e6)
    starts = [b[0] for b in blocking]

    def host_during(a, b):
        """The longest host-blocking CUDA call overlapping [a, b]."""
        i = max(0, bisect.bisect_left(starts, a) - 1)
        best = None
        while i < len(blocking) and blocking[i][0] <= b:
            lo, hi, name = blocking[i]
            if hi >= a and (best is None or hi - lo > best[0]):
                best = (hi - lo, name)
            i += 1
        return f"{best[1]} {best[0] / 1e3:.2f} ms" if best else "-"

    gaps = []
    for start, e in common.gaps_between(kernels):
        launched = launch_ts.get(e.get("args", {}).get("correlation"))
        gaps.append([round((e["ts"] - start) / 1e6, 5), e["name"][:60],
                     "host late" if launched is not None and launched > start else "launched before",
                     host_during(start, e["ts"])])
    late = sum(g[0] for g in gaps if g[2] == "host late")
    return {"file": Path(path).name, "steps": steps, "kernels": len(kernels),
            "per_step_s": {"span": round(span / steps, 4), "busy": round(busy / steps, 4),
                           "idle": round((span - busy) / steps, 4), "idle_host_late": round(late / steps, 4),
                           **{k: round(v / steps, 4) for k, v in sorted(by_kind.items())}},
            "host_blocking_calls": sorted(([k, n, round(t, 4)] for k, (n, t) in syncs.items()),
                                          key=lambda r: -r[2])[:8],
            "longest_gaps": sorted(gaps, reverse=True)[:12]}


def main():
    common.multicast_off()
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--case", default="897x768x512")
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--steps", default="8,20", help="two step counts: s/step is the slope between them")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--ffn", default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny dims on CPU workers: a smoke run")
    ap.add_argument("--speed-only", action="store_true", help="skip the memory-drift and fault checks")
    ap.add_argument("--trace", default=None, help="folder: after each W's timing, one more run traced by its "
                    "workers (LTXAV_PARALLEL_TRACE_DIR), summarised per worker")
    ap.add_argument("--ckpt", default="/tmp/ltxav_bench.safetensors")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    common.import_comfy(a.comfy)
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd

    common.import_pack()
    from ltxav_pack import driver, envs, jobs

    info = common.device_info()
    command = "python bench/ray_sampler.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()
                                                        if k not in ("comfy", "out", "ckpt") and v is not False)
    s1, s2 = (int(x) for x in a.steps.split(","))
    rows = []

    def emit(row):
        row.update(bench="ray_sampler", case=a.case, layers=a.layers, ffn=a.ffn, **info, command=command)
        rows.append(row)
        print(json.dumps(row), flush=True)

    t0 = time.perf_counter()
    config = common.write_checkpoint(a.ckpt, a.layers, a.tiny)
    print(f"checkpoint written in {time.perf_counter() - t0:.1f} s", flush=True)
    patcher = comfy.sd.load_diffusion_model(a.ckpt)
    common.chunk_ffn(patcher, a.ffn)
    latent, noise, pos, neg, tokens = common.sample_inputs(a.case, config["caption_channels"])

    marks = []

    def stock(steps):
        marks[:] = [time.perf_counter()]
        return comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", pos, neg, latent,
                                   disable_pbar=True, seed=0, callback=lambda *_: marks.append(time.perf_counter()))

    def timed(fn):
        common.sync()
        t = time.perf_counter()
        out = fn()
        common.sync()
        return out, time.perf_counter() - t

    def slope(t1, t2):
        per_step = (t2 - t1) / (s2 - s1)
        return dict(s_per_step=round(per_step, 4), per_prompt_overhead_s=round(t1 - s1 * per_step, 3),
                    wall_s={s1: round(t1, 3), s2: round(t2, 3)})

    # W = 1: ComfyUI's own sampler in this process, GPU 0
    stock(s1)
    stock(s1)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    want, t1 = timed(lambda: stock(s1))
    _, t2 = timed(lambda: stock(s2))
    peak = (torch.cuda.max_memory_allocated() - base) / common.GB if torch.cuda.is_available() else None
    stock_step = slope(t1, t2)["s_per_step"]
    stock_median = driver.report.step_timings(marks)["worker_s_per_step"]  # the workers' statistic
    emit(dict(world=1, mode="stock comfy.sample.sample", **slope(t1, t2), step_median_s=stock_median,
              step_s=[round(b - a, 4) for a, b in zip(marks[:-1], marks[1:])], video_tokens=tokens,
              peak_over_start_gb=None if peak is None else round(peak, 3)))
    mm.unload_all_models()
    mm.soft_empty_cache()

    pool = driver.POOL

    def job(steps):
        return jobs.KSamplerJob(noise=noise, latent=latent, noise_mask=None, seed=0, steps=steps, cfg=1.0,
                                sampler_name="euler", scheduler="simple", positive=pos, negative=neg)

    worlds = [int(w) for w in a.worlds.split(",")]
    for world in worlds:
        settings = driver.ParallelSettings(gpus=world)
        first = pool.run(patcher, job(s1), settings)
        r1, t1 = timed(lambda: pool.run(patcher, job(s1), settings))
        r2, t2 = timed(lambda: pool.run(patcher, job(s2), settings))
        err = max(common.rel_l2(g, w) for g, w in zip(r1.samples.unbind(), want.unbind()))
        fit = slope(t1, t2)
        emit(dict(world=world, mode="LTXAV parallel sampler (Ray)", **fit,
                  speedup_vs_stock=round(stock_step / fit["s_per_step"], 3),
                  worker_s_per_step=r2.timings.get("worker_s_per_step"),
                  speedup_by_median_step=round(stock_median / r2.timings["worker_s_per_step"], 3),
                  worker_mean_s_per_step=r2.timings.get("worker_mean_s_per_step"),
                  worker_step_s=[round(b - a, 4) for a, b in zip(r2.step_times[:-1], r2.step_times[1:])],
                  worker_setup_s=r2.timings.get("worker_setup_s"),
                  timings=r2.timings,
                  ray_start_s=first.timings["ray_start_s"], model_load_s=first.timings["model_load_s"],
                  video_tokens=tokens, per_worker_memory=[dataclasses.asdict(m) for m in r2.memory],
                  rel_l2_vs_stock=round(err, 5)))
        if a.trace:  # one more run, traced by fresh workers (the variable is read when they start)
            pool.stop_group()
            folder = Path(a.trace) / f"w{world}"
            os.environ[envs.TRACE_DIR.name] = str(folder)
            try:
                pool.run(patcher, job(s1), settings)  # the workers' first run also loads the model
                pool.run(patcher, job(s1), settings)
            finally:
                del os.environ[envs.TRACE_DIR.name]
                pool.stop_group()
            newest = {}
            for f in sorted(folder.glob("rank*.json"), key=lambda f: int(f.stem.split("-")[-1])):
                newest[f.name.split("-")[0]] = f
            emit(dict(world=world, mode=f"profiler trace of a second {s1}-step run (model loaded), per worker",
                      traces=[trace_summary(f, s1) for _, f in sorted(newest.items())]))
    if a.speed_only:
        pool.stop_group()
        if a.out:
            Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    world = worlds[-1]
    settings = driver.ParallelSettings(gpus=world)
    pids = [i["pid"] for i in pool.group.infos]
    after_first = process_used_mb(pids)
    for _ in range(a.prompts - 1):
        pool.run(patcher, job(s1), settings)
    after_last = process_used_mb(pids)
    emit(dict(world=world, mode=f"{a.prompts} prompts in a row", worker_gpu_mb_after_first=after_first,
              worker_gpu_mb_after_last=after_last,
              max_drift_mb=max((abs(x - y) for x, y in zip(after_first, after_last)), default=None)))

    # a real out-of-memory: workers capped just above the weights, the planner's check skipped
    weights_gb = sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters()) / jobs.GIB
    pool.stop_group()
    before = gpu_used_mb()
    os.environ[envs.MEMORY_CAP_GIB.name] = f"{weights_gb + 0.3:.3f}"
    os.environ[envs.SKIP_MEMORY_CHECK.name] = "1"
    t0 = time.perf_counter()
    oom = _try(pool.run, patcher, job(s1), settings)
    oom_s = time.perf_counter() - t0
    time.sleep(3)
    after_oom = gpu_used_mb()
    del os.environ[envs.SKIP_MEMORY_CHECK.name]
    t0 = time.perf_counter()
    refused = _try(pool.run, patcher, job(s1), settings)  # the planner's check, same cap
    refused_s = time.perf_counter() - t0
    del os.environ[envs.MEMORY_CAP_GIB.name]
    pool.stop_group()
    recovered = pool.run(patcher, job(s1), settings)
    emit(dict(world=world, mode="real out-of-memory (cap = weights + 0.3 GB, check skipped), then the planner",
              cap_gb=round(weights_gb + 0.3, 3), error=oom[:400], seconds_to_error=round(oom_s, 2),
              gpu_used_mb_before=before, gpu_used_mb_after_error=after_oom, planner_refusal=refused[:600],
              planner_refusal_s=round(refused_s, 2),
              next_prompt_ok=bool(recovered.get("samples") is not None)))

    # a worker killed mid-run: the run errors, the workers are stopped, their GPU memory is released
    pids = [i["pid"] for i in pool.group.infos]
    before = gpu_used_mb()
    box = {}
    long = s1 * 50
    t = threading.Thread(target=lambda: box.update(r=_try(pool.run, patcher, job(long), settings)))
    t.start()
    import ray

    while pool.group is None or ray.get(pool.group.actors[0].progress.remote()) in range(s1, s1 + 2):
        time.sleep(0.2)  # until the long run is past step s1 + 1 (the last run left progress at s1)
    os.kill(pids[1], 9)
    t0 = time.perf_counter()
    t.join()
    error_s = time.perf_counter() - t0
    time.sleep(5)
    released = gpu_used_mb()
    alive = [p for p in pids if _alive(p)]
    recovered = pool.run(patcher, job(s1), settings)
    emit(dict(world=world, mode="worker 1 killed mid-run", error=str(box["r"])[:300],
              seconds_from_kill_to_error=round(error_s, 2), gpu_used_mb_before=before,
              gpu_used_mb_after_error=released, worker_pids_still_alive=alive,
              next_prompt_s_per_step=recovered.timings["s_per_step"]))
    pool.stop_group()
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _try(fn, *args):
    try:
        fn(*args)
        return "no error"
    except BaseException as e:  # noqa: BLE001 - reported
        return f"{type(e).__name__}: {e}"


if __name__ == "__main__":
    main()
