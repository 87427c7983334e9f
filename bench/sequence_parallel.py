"""Per-rank peak memory and forward time of the sequence-parallel LTXAV forward on 1..W GPUs, at
real LTX-2 dims (random weights, a few layers), against ComfyUI's stock forward on one GPU (W=1).

Usage: python bench/sequence_parallel.py --comfy PATH [--layers 4] [--worlds 1,2,4,2r,4h]
          [--cases 897x768x512,897x1280x704,897x1920x1088] [--i2v 0,1] [--ffn auto] [--repeats 3]
          [--head-groups 1] [--profile] [--pack DIR] [--out results.jsonl]
One process per GPU (NCCL); W=1 is the plain ComfyUI forward (no sequence parallelism). A world is
W (all Ulysses), Wr (all ring) or Wh (Ulysses 2 x ring W/2). Both use the
pack's FFN chunking (``--ffn``: auto, a chunk count, or 1 for off). Memory is PyTorch's allocator:
peak allocated above the weights, per rank, for the forward and for its PE and block phases (a
separate synchronised pass); time is the median of ``--repeats`` forwards. A correctness check
compares each W>1 output of the first case with the W=1 output (relative L2, bf16).
--head-groups sets the Ulysses head grouping (``xdit_context_parallel.HEAD_GROUPS``; ring keeps its
own). --profile: one more forward under torch.profiler; each row gets the GPU time per kernel kind (matmul, attention,
communication, copies, other), the time the GPU was busy, the communication no compute overlapped,
the top kernels, the GPU time per ComfyUI / pack line that launched it, and the longest idle gaps
(with the kernel and line after each). --pack measures another checkout of the pack (an older
commit exported to a folder) with this script.
"""
import argparse
import bisect
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

KB = 1024
SOURCES = ("/comfy/", "/comfy_extras/", "ltxav_pack", "xdit_context_parallel.py", "ffn_chunking.py")


def python_lines(events):
    """A function (cpu ts, tid) -> the innermost ComfyUI / pack Python line running on that thread
    then (the trace's python_function events)."""
    frames = {}
    for e in events:
        if e.get("cat") == "python_function" and any(k in e["name"] for k in SOURCES):
            frames.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
    starts = {}
    for tid, fs in frames.items():
        fs.sort()
        starts[tid] = [f[0] for f in fs]

    def where(ts, tid):
        fs = frames.get(tid, [])
        i = bisect.bisect_right(starts.get(tid, []), ts) - 1
        while i >= 0:
            if fs[i][1] >= ts:
                return fs[i][2].split("/")[-1]
            i -= 1
        return "?"
    return where


def by_source(leaves, where, top=25):
    """Sum ``leaves`` [(cpu ts, tid, seconds, kernel name)] per line that launched them."""
    sums = {}
    for ts, tid, sec, kernel in leaves:
        key = f"{where(ts, tid)} | {common.kind_of(kernel)}"
        sums[key] = sums.get(key, 0.0) + sec
    return [[k, round(v, 4)] for k, v in sorted(sums.items(), key=lambda kv: -kv[1])[:top]]


def idle_gaps(kernels, launches, where, top=10):
    """The longest stretches with no kernel on the GPU, each with the kernel that ended it and the
    line that launched that kernel: [seconds, kernel, line]."""
    gaps = []
    for start, e in common.gaps_between(kernels):
        launch = launches.get(e.get("args", {}).get("correlation"))
        line = where(launch["ts"], launch["tid"]) if launch else "?"
        gaps.append([round((e["ts"] - start) / 1e6, 5), e["name"][:60], line])
    return sorted(gaps, reverse=True)[:top]


def gpu_profile(run):
    """GPU time of one call of ``run`` by kernel kind and by the ComfyUI / pack line that launched
    it, from a torch.profiler trace (with Python stacks)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        run()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        return None
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    by_kind, by_name, spans, leaves = {}, {}, {}, []
    for e in kernels:
        k = common.kind_of(e["name"])
        by_kind[k] = by_kind.get(k, 0.0) + e["dur"] / 1e6
        by_name[e["name"][:90]] = by_name.get(e["name"][:90], 0.0) + e["dur"] / 1e6
        spans.setdefault(k, []).append((e["ts"], e["ts"] + e["dur"]))
        launch = launches.get(e.get("args", {}).get("correlation"))
        if launch:
            leaves.append((launch["ts"], launch["tid"], e["dur"] / 1e6, e["name"]))
    everything = [iv for ivs in spans.values() for iv in ivs]
    where = python_lines(events)
    compute = [iv for k, ivs in spans.items() if k != "communication" for iv in ivs]
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return dict(kernel_s={k: round(v, 4) for k, v in sorted(by_kind.items())},
                busy_s=round(common.union_s(everything), 4),
                span_s=round((max(b for _, b in everything) - min(a for a, _ in everything)) / 1e6, 4),
                exposed_communication_s=round(common.union_s(everything) - common.union_s(compute), 4),
                kernels=len(kernels), top=[[n, round(t, 4)] for n, t in top], by_source=by_source(leaves, where),
                idle_gaps=idle_gaps(kernels, launches, where))


class _Mem:
    """torch.cuda memory calls, as zeros on CPU (the --tiny smoke run)."""

    def __getattr__(self, name):
        if torch.cuda.is_available():
            return getattr(torch.cuda, name)
        return lambda *args, **kwargs: 0


cuda = _Mem()


def parse_world(token):
    """'4' -> (4, ulysses 4, ring 1); '4r' -> (4, 1, 4); '4h' -> (4, 2, 2)."""
    w = int(token.rstrip("rh"))
    if token.endswith("r"):
        return w, 1, w
    if token.endswith("h"):
        return w, 2, w // 2
    return w, w, 1


def rank_main(rank, token, a, init_file, out_dir):
    world, ulysses, ring = parse_world(token)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    common.import_comfy(a.comfy)
    import comfy.patcher_extension

    common.import_pack(root=a.pack)
    from ltxav_pack import ffn_chunking
    from ltxav_pack import xdit_context_parallel as xsp
    from ltxav_pack.sequence_parallel import groups

    xsp.HEAD_GROUPS = a.head_groups
    dmw = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    wrappers = {}
    if world > 1:
        groups.init_process_groups(rank, world, groups.Degrees(ulysses, ring),
                                "nccl" if on_gpu else "gloo", f"file://{init_file}")
        sp = xsp.SequenceParallel()
        wrappers["sp"] = [sp.wrapper]
    to = {"wrappers": {dmw: wrappers}}
    if a.ffn != "1":
        wrappers["ffn"] = [ffn_chunking.diffusion_model_wrapper]
        auto = a.ffn == "auto"
        to[ffn_chunking.CHUNKING_KEY] = ffn_chunking.ChunkSettings(1 if auto else int(a.ffn), auto).as_dict()

    torch.manual_seed(0)
    model = common.build_model(a.layers, tiny=a.tiny,
                               device=torch.device("cuda", rank) if on_gpu else torch.device("cpu"))
    cuda.synchronize()
    weights = cuda.memory_allocated()
    phases = {}

    def phase(name):
        fn = getattr(model, name)

        def run(*args, **kwargs):
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
            out = fn(*args, **kwargs)
            cuda.synchronize()
            phases[name] = cuda.max_memory_allocated() - weights
            return out
        return run

    rows = []
    for ci, case in enumerate(a.cases.split(",")):
        for i2v in (int(v) for v in a.i2v.split(",")):
            inputs, tokens = common.make_inputs(model, case, i2v=bool(i2v))
            err = None
            try:
                with torch.no_grad():
                    out = model(**inputs, transformer_options=to)  # warm-up
                    cuda.synchronize()
                    cuda.empty_cache()
                    cuda.reset_peak_memory_stats()
                    out = model(**inputs, transformer_options=to)
                    cuda.synchronize()
                    peak = cuda.max_memory_allocated() - weights
                    if ci == 0 and i2v == 0:
                        check = Path(out_dir).parent / "check.pt"
                        if world == 1:
                            torch.save([o.float().cpu() for o in out], check)
                        elif check.exists():
                            ref = torch.load(check)
                            err = max(common.rel_l2(o.float().cpu(), r) for o, r in zip(out, ref))
                    del out
                    times = []
                    for _ in range(a.repeats):
                        cuda.synchronize()
                        t0 = time.perf_counter()
                        model(**inputs, transformer_options=to)
                        cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    # phase peaks (synchronised pass)
                    phases.clear()
                    model._prepare_positional_embeddings = phase("_prepare_positional_embeddings")
                    model._process_transformer_blocks = phase("_process_transformer_blocks")
                    model(**inputs, transformer_options=to)
                    del model._prepare_positional_embeddings, model._process_transformer_blocks
                    profiled = (gpu_profile(functools.partial(model, **inputs, transformer_options=to))
                                if a.profile and on_gpu else None)
                row = dict(peak_over_weights_gb=round(peak / common.GB, 3),
                           pe_peak_gb=round(phases["_prepare_positional_embeddings"] / common.GB, 3),
                           blocks_peak_gb=round(phases["_process_transformer_blocks"] / common.GB, 3),
                           forward_s=round(statistics.median(times), 4), times=[round(t, 4) for t in times],
                           profile=profiled)
            except torch.OutOfMemoryError as e:
                row = dict(error=str(e).splitlines()[0][:160])
            row.update(case=case, i2v=i2v, rank=rank, world=world, video_tokens=tokens,
                       weights_gb=round(weights / common.GB, 3), rel_l2_vs_w1=err)
            rows.append(row)
            del inputs
            cuda.empty_cache()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(rows))
    if world > 1:
        groups.destroy_process_groups()


def main():
    common.multicast_off()
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--cases", default="897x768x512,897x1280x704,897x1920x1088")
    ap.add_argument("--i2v", default="0,1")
    ap.add_argument("--ffn", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--head-groups", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--pack", default=None, help="another checkout of the pack to measure (default: this one)")
    ap.add_argument("--tiny", action="store_true", help="tiny dims on CPU (gloo): a smoke run")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    info = common.device_info()
    command = "python bench/sequence_parallel.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(a).items() if k not in ("comfy", "out") and v is not False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for token in a.worlds.split(","):
            world, ulysses, ring = parse_world(token)
            out_dir = Path(tmp) / f"w{token}"
            out_dir.mkdir()
            t0 = time.perf_counter()
            mp.start_processes(rank_main, args=(token, a, str(Path(tmp) / f"init{token}"), str(out_dir)),
                               nprocs=world, start_method="spawn")
            per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
            for rows in zip(*per_rank):
                first = rows[0]
                peaks = [r.get("peak_over_weights_gb") for r in rows]
                tokens = first["video_tokens"]
                target = (64 * KB * tokens / world + 0.5 * common.GB) / common.GB
                res = dict(bench="sequence_parallel", world=world, case=first["case"], i2v=first["i2v"],
                           layers=a.layers, video_tokens=tokens, weights_gb=first["weights_gb"],
                           per_rank_peak_over_weights_gb=peaks,
                           per_rank_pe_peak_gb=[r.get("pe_peak_gb") for r in rows],
                           per_rank_blocks_peak_gb=[r.get("blocks_peak_gb") for r in rows],
                           forward_s=max((r.get("forward_s") or 0) for r in rows),
                           target_gb=round(target, 3) if world > 1 else None,
                           within_target=(all(p is not None and p <= target for p in peaks) if world > 1 else None),
                           rel_l2_vs_w1=first["rel_l2_vs_w1"], error=first.get("error"),
                           ffn=a.ffn, ulysses=ulysses, ring=ring, head_groups=a.head_groups,
                           times=first.get("times"),
                           profile=[r.get("profile") for r in rows] if a.profile else None,
                           **info, command=command,
                           run_s=round(time.perf_counter() - t0, 1))
                results.append(res)
                print(json.dumps(res), flush=True)
    print(f"{'W':>2} {'U':>2} {'R':>2} {'case':>14} {'i2v':>3} {'peak/rank GB':>13} {'target':>7} {'PE':>6} "
          f"{'blocks':>7} {'fwd s':>7} {'relL2':>8}")
    for r in results:
        print(f"{r['world']:>2} {r['ulysses']:>2} {r['ring']:>2} {r['case']:>14} {r['i2v']:>3} "
              f"{max(p or -1 for p in r['per_rank_peak_over_weights_gb']):>13} "
              f"{r['target_gb']!s:>7} {max(p or -1 for p in r['per_rank_pe_peak_gb']):>6} "
              f"{max(p or -1 for p in r['per_rank_blocks_peak_gb']):>7} {r['forward_s']:>7} {r['rel_l2_vs_w1']!s:>8}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
