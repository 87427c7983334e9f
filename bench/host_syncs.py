"""Where the host waits for the GPU in an LTXAV sampling step, and what the step costs: every CUDA
call that blocks the host until the GPU queue drains (PyTorch's sync debug mode), counted per step
by the ComfyUI / pack line that made it, and the median step time, for ComfyUI's stock sampler and
for the pack's sequence-parallel forward (the workers' code path: the same wrapper, in this process,
one GPU, world 1).

Usage: python bench/host_syncs.py --comfy PATH [--layers 4] [--case 897x768x512] [--i2v]
          [--steps 2,4] [--timed-steps 20] [--pack DIR] [--out results.jsonl]
Syncs per step are the difference between two runs (``--steps``) divided by their step difference;
those in both runs alike (set-up) are reported per run. --pack measures another checkout of the
pack (an older commit exported to a folder).
"""
import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

OWN = ("/comfy/", "/comfy_extras/", "xdit_context_parallel.py", "/sequence_parallel/", "/models/", "ffn_chunking.py",
       "ray_worker.py", "held_model.py")


def call_site():
    """The innermost ComfyUI / pack frames of the current stack: 'file:line function' up to 3 deep."""
    frames = [f for f in traceback.extract_stack()[:-2] if any(k in f.filename for k in OWN)]
    return " < ".join(f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))


def census(run):
    """{call site: count} of the synchronising CUDA calls ``run()`` makes."""
    sites = {}

    def record(message, category, *_args, **_kw):
        if "synchronizing" in str(message):
            site = call_site()
            sites[site] = sites.get(site, 0) + 1

    if not torch.cuda.is_available():
        run()
        return sites
    with warnings.catch_warnings():  # restores showwarning and the filters on the way out
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sites


def main():
    common.multicast_off()
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--case", default="897x768x512")
    ap.add_argument("--i2v", action="store_true", help="first latent frame kept (a noise mask), as image-to-video")
    ap.add_argument("--steps", default="2,4")
    ap.add_argument("--timed-steps", type=int, default=20)
    ap.add_argument("--ffn", default="auto")
    ap.add_argument("--pack", default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny dims on CPU (gloo, no sync census): a smoke run")
    ap.add_argument("--ckpt", default="/tmp/ltxav_syncs.safetensors")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    common.import_comfy(a.comfy)
    import comfy.nested_tensor
    import comfy.patcher_extension
    import comfy.sample
    import comfy.sd

    common.import_pack(root=a.pack)
    from ltxav_pack import driver
    from ltxav_pack import xdit_context_parallel as xsp
    from ltxav_pack.sequence_parallel import groups

    info = common.device_info()
    command = "python bench/host_syncs.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(a).items()
        if k not in ("comfy", "out", "ckpt") and v not in (False, None))
    s1, s2 = (int(x) for x in a.steps.split(","))
    config = common.write_checkpoint(a.ckpt, a.layers, tiny=a.tiny)
    stock = comfy.sd.load_diffusion_model(a.ckpt)
    common.chunk_ffn(stock, a.ffn)
    latent, noise, pos, neg, tokens = common.sample_inputs(a.case, config["caption_channels"])
    mask = None
    if a.i2v:  # as LTXVImgToVideoInplace leaves it: the first latent frame kept
        video, audio = latent.unbind()
        vmask = torch.ones(1, 1, video.shape[2], 1, 1)
        vmask[:, :, 0] = 0.0
        mask = comfy.nested_tensor.NestedTensor((vmask, torch.ones_like(audio)))  # as LTXVConcatAVLatent

    port = common.free_port()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    groups.init_process_groups(0, 1, groups.Degrees(1, 1), backend, f"tcp://127.0.0.1:{port}")
    sp = xsp.SequenceParallel(rank_label=0, phase_stats=True)
    pack = stock.clone()
    pack.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, xsp.WRAPPER_KEY,
                              sp.wrapper)
    want = None
    for name, patcher in (("stock", stock), ("pack, world 1", pack)):
        marks = []

        def run(steps):
            sp.reset()  # as the worker does at the start of each run
            marks[:] = [time.perf_counter()]
            return comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", pos, neg, latent,
                                       noise_mask=mask, disable_pbar=True, seed=0,
                                       callback=lambda *_: marks.append(time.perf_counter()))

        run(s1)  # warm-up: loads the model, tunes kernels
        short, long = census(lambda: run(s1)), census(lambda: run(s2))
        per_step = {k: round((long.get(k, 0) - short.get(k, 0)) / (s2 - s1), 2) for k in set(short) | set(long)}
        per_run = {k: round(short.get(k, 0) - s1 * per_step.get(k, 0), 2) for k in short}
        out = run(a.timed_steps)
        common.sync()
        steps = [b - a_ for a_, b in zip(marks[:-1], marks[1:])]
        if want is None:
            want = out
        err = max(common.rel_l2(g, w) for g, w in zip(out.unbind(), want.unbind()))
        row = dict(mode=name, i2v=a.i2v, syncs_per_step=round(sum(per_step.values()), 2),
                   syncs_per_run=round(sum(per_run.values()), 2),
                   per_step={k: v for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]) if v},
                   per_run={k: v for k, v in sorted(per_run.items(), key=lambda kv: -kv[1]) if v},
                   **driver.report.step_timings(marks), step_s=[round(s, 4) for s in steps],
                   rel_l2_vs_stock=round(err, 5), video_tokens=tokens, bench="host_syncs", case=a.case,
                   layers=a.layers, ffn=a.ffn, pack=a.pack or "this checkout", **info, command=command)
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    groups.destroy_process_groups()


if __name__ == "__main__":
    main()
