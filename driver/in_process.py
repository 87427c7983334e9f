"""A run in ComfyUI's own process (one local GPU: ``plan.one_gpu_here``), as ComfyUI's own sampler
nodes sample, after the planner's check against this GPU."""
from __future__ import annotations

import contextlib
import logging
import time

import torch

from .. import comfy_host, envs, guidance_passes, instrumentation, jobs, lean_attention, memory_plan, model_transfer
from ..sequence_parallel.groups import Degrees
from .plan import NODE, check_memory, needs_lean_attention
from .report import step_timings, summary_here
from .workers import own_keys

log = logging.getLogger(__name__)


def run_here(pool, patcher, job: jobs.KSamplerJob | jobs.GuiderJob) -> jobs.RunResult:
    """Sample ``job`` in ComfyUI's process, as ComfyUI's own sampler nodes do (its model management,
    its progress bar, and with it Interrupt), after the planner's check against this GPU; ``pool``: the
    worker group (``workers.Workers``), stopped first."""
    import comfy.utils

    pool.stop_group()  # an earlier prompt's workers would hold memory on this GPU
    device = patcher.load_device
    cuda = device.type == "cuda"
    info = {"device": f"{torch.cuda.get_device_name(device)} ({device})" if cuda else str(device),
            "dynamic_vram": comfy_host.dynamic_vram_enabled() and patcher.is_dynamic()}
    est = None
    passes = guidance_passes.count(patcher, job, model_transfer.dumps_job(job, patcher, own_keys()), NODE)
    lean = lean_attention.enabled()  # unchecked runs keep it: the longest clips
    if not envs.SKIP_MEMORY_CHECK.on():
        budget = here_budget(device)
        # ComfyUI's own attention (stock's forward and speed) where it fits; the lean one where the clip needs it
        lean = needs_lean_attention(patcher, job.latent, budget, [info], passes)
        est = check_memory(patcher, job.latent, Degrees(1), budget, [info], passes, lean=lean)
        streamed = "; weights streamed from host memory (DynamicVRAM)" if info["dynamic_vram"] else ""
        attention = "lean attention (the clip needs it)" if lean else "ComfyUI's attention"
        log.info("%s: planned peak %.2f GiB of %.2f GiB free (in ComfyUI's process, one GPU, %s; %s%s)", NODE,
                 est.total / memory_plan.GIB, budget / memory_plan.GIB, attention, est.describe(), streamed)
    pool.status("sampling in ComfyUI's process (one GPU: no workers)")
    pbar = comfy.utils.ProgressBar(job.total_steps)
    marks, last = [time.perf_counter()], {}

    def callback(step, x0, x, total):
        marks.append(time.perf_counter())
        last["x0"] = x0
        pbar.update_absolute(step + 1, total)  # ComfyUI's hook: the UI's bar, and Interrupt

    # the run's peak only with memory logs on: resetting PyTorch's peak counters just before sampling ran
    # out of memory where stock ComfyUI ran (fp8, 3,001 frames on 16 GiB: bench/README.md)
    peak_wanted = cuda and instrumentation.enabled()
    if peak_wanted:
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    # the patcher that samples: a guider's own (the same MODEL), else the node's
    sampling = getattr(getattr(job, "guider", None), "model_patcher", None) or patcher
    try:
        with lean_attention.on(sampling) if lean else contextlib.nullcontext():
            samples = job.sample(patcher, callback)
    except torch.OutOfMemoryError as e:  # the same type: ComfyUI's executor frees its models on it
        plan = "" if est is None else (
            f" The plan was {est.total / memory_plan.GIB:.2f} GiB of {budget / memory_plan.GIB:.2f} GiB free; the "
            f"allocator's pool comes on top (clips planned within {memory_plan.EDGE_BYTES / memory_plan.GIB:.1f} "
            "GiB of the free memory ran out of memory in stock ComfyUI too).")
        raise torch.OutOfMemoryError(f"{NODE}: ran out of GPU memory during sampling on {info['device']} "
                                     f"({str(e).splitlines()[0]}). Use more GPUs (input 'gpus'), the LTX FFN "
                                     f"Chunker, or a shorter or smaller video.{plan}") from e
    sample_s = marks[-1] - marks[0]
    gpu = {}
    if cuda:
        gpu = {"peak_gib": jobs.gib(torch.cuda.max_memory_allocated(device) - start) if peak_wanted else None,
               "allocated_gib": jobs.gib(torch.cuda.memory_allocated(device)),
               "weights_gib": jobs.gib(patcher.loaded_size())}
    memory = [jobs.WorkerMemory(rank=0, **gpu, **instrumentation.host_memory(jobs.gib))]
    timings = {"sampling_s": round(sample_s, 2), "s_per_step": round(sample_s / max(1, job.total_steps), 4),
               **step_timings(marks)}
    text = summary_here(info, memory[0], timings)
    log.info("%s", text)
    x0 = last.get("x0")
    return jobs.RunResult(samples=samples, x0=None if x0 is None else x0.cpu(), memory=memory, timings=timings,
                          model_load=None, planned_peak_gib=None if est is None else jobs.gib(est.total),
                          summary=text, step_times=marks, passes=[sum(passes.calls)],
                          planned_parts_gib=None if est is None else {k: jobs.gib(v) for k, v in est.parts.items()})


def here_budget(device) -> int:
    """Bytes a sampling run in ComfyUI's process can use on ``device``: what ComfyUI counts free there
    plus the weights of the models it has loaded on it (it unloads or pages them out as a run needs),
    within ``LTXAV_PARALLEL_MEMORY_CAP_GIB``."""
    import comfy.model_management as mm

    loaded = sum(m.model_loaded_memory() for m in mm.current_loaded_models
                 if m.model is not None and m.device == device)
    budget = mm.get_free_memory(device) + loaded
    cap = envs.MEMORY_CAP_GIB.number() * jobs.GIB
    return int(min(budget, cap) if cap else budget)
