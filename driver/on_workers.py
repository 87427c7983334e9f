"""A run on the Ray workers: count the job's passes, refuse what no budget changes before any worker
starts, start (or keep) ``world`` workers, read their memory budgets, make the plan (``plan.plan``), set
their process groups once with its degrees, load the model, sample with progress and Interrupt, and
report."""
from __future__ import annotations

import logging
import time

from .. import envs, guidance_passes, jobs, memory_plan, model_transfer
from .plan import NODE, ParallelSettings, model_streams, plan
from .report import StepProgress, short_names, step_timings, summary
from .workers import Workers, cpu_mode, free_gpu_for_workers, own_keys

log = logging.getLogger(__name__)


def run_on_workers(pool: Workers, patcher, job: jobs.KSamplerJob | jobs.GuiderJob,
                   settings: ParallelSettings) -> jobs.RunResult:
    """Sample ``job`` on ``pool``'s workers."""
    import comfy.model_management

    pool.connect(settings.ray_address)  # first: it decides how Ray is imported
    import ray
    t_prepare = time.perf_counter()
    model = model_transfer.model_spec(patcher, own_keys=own_keys(), node=NODE)
    if model.skipped:
        log.warning("%s: not reproduced on the workers (cannot be pickled): %s", NODE, short_names(model.skipped))
    if model.not_sent:
        log.warning("%s: not reproduced on the workers (not sent): the MODEL's %s", NODE, ", ".join(model.not_sent))
    # the passes, by a dry run of the job as the workers get it: with the MODEL's options, in one pickle
    job_bytes = model.job_payload(job)
    passes = guidance_passes.count(patcher, job, job_bytes, NODE)
    cpu = cpu_mode()
    available = pool.available(cpu)
    # what no budget changes (the inputs, the degrees, too few tokens) is refused before any worker starts
    shaped = plan(settings, passes, patcher, job.latent, available, cpu, pool.address)
    world = shaped.world
    total_steps = job.total_steps
    free_gpu_for_workers()
    prepare_s = time.perf_counter() - t_prepare

    group, start_s = pool.ensure_group(world, cpu)
    budgets = None
    if not envs.SKIP_MEMORY_CHECK.on():
        budgets = pool._wait([a.memory_budget.remote() for a in group.actors], "start", envs.START_S.number())
    the_plan = plan(settings, passes, patcher, job.latent, available, cpu, pool.address, budgets, group.infos,
                    shaped=shaped)  # the workers and degrees decided above, now with the memory verdict
    for note in the_plan.notes:
        log.info("%s: %s", NODE, note)
    start_s += pool.set_degrees(group, the_plan.degrees)
    est = the_plan.estimate
    if est is not None:
        streams = model_streams(patcher, group.infos)
        streamed = "; weights streamed from host memory (DynamicVRAM)" if streams else ""
        log.info("%s: planned peak %.2f GiB per worker of %.2f GiB free (%s; %s%s)", NODE,
                 est.total / memory_plan.GIB, the_plan.budget / memory_plan.GIB, est.note, est.describe(), streamed)
    if group.file_key != model.file_key:
        pool.status(f"loading the model on {world} workers")
    elif group.model_key != model.key:
        pool.status(f"applying the MODEL's changed weight patches (LoRA) on {world} workers, without reading the "
                    "file again")
    t0 = time.perf_counter()
    # workers that hold this model already get no copy of its patches (a LoRA can be GBs)
    recipe_ref = ray.put(model.recipe)
    spec_ref = ray.put(model.spec) if group.model_key != model.key else None
    loads = pool._wait([a.load.remote(model.file_key, model.key, recipe_ref, spec_ref) for a in group.actors],
                       "model load", envs.LOAD_S.number())
    load_s = time.perf_counter() - t0
    load = loads[0]
    action = load.action
    if action != "kept":
        log.info("%s: model %s on %d workers in %.1f s", NODE,
                 "loaded" if action == "read" else "patches re-applied", world, load_s)
    group.file_key, group.model_key = model.file_key, model.key
    dropped = rebuild_check(pool, group, model)
    if dropped:  # the options no worker can rebuild stay behind (the count above included them)
        t_payload = time.perf_counter()
        job_bytes = model.job_payload(job, dropped)
        prepare_s += time.perf_counter() - t_payload
    pool.status(f"sampling on {world} workers")

    t0 = time.perf_counter()
    job_ref = ray.put(job_bytes)
    progress = StepProgress(total_steps)
    results = pool._wait([a.sample.remote(job_ref) for a in group.actors], "sampling", envs.STALL_S.number(),
                         progress=progress)
    sample_s = time.perf_counter() - t0
    first = results[0]
    if first.error:  # nothing sampled, the workers stay
        packs = ", ".join(model_transfer.modules_of(job_bytes)) or "no node pack"
        raise ValueError(f"{NODE}: the workers cannot rebuild the sampler's inputs (they refer to {packs}): "
                         f"{first.error}. Whatever the guider or conditioning refers to must import in the "
                         "workers as in ComfyUI (on other machines of a Ray cluster: the same node packs at the "
                         "same paths); gpus=1 samples in ComfyUI's process.")
    progress.to(first.step)  # the steps the last polls did not see
    marks = first.step_times
    memory = [r.memory for r in results]
    if first.interrupted:
        log.info("%s: interrupted at step %d; the workers stay loaded", NODE, first.step)
        comfy.model_management.interrupt_current_processing(False)
        raise comfy.model_management.InterruptProcessingException()
    # prepare: the model spec and the job with the model's options pickled here; outside_steps: the
    # sampling call's time beyond the workers' own marks (their sampling's start to its last step): job
    # and result transfer, Ray's scheduling and the workers' tear-down
    timings = {"ray_start_s": round(start_s, 2), "model_load_s": round(load_s, 2),
               "sampling_s": round(sample_s, 2), "s_per_step": round(sample_s / max(1, total_steps), 4),
               "prepare_s": round(prepare_s, 3), "job_mb": round(len(job_bytes) / 1e6, 1),
               "outside_steps_s": round(sample_s - (marks[-1] - marks[0]), 3) if len(marks) > 1 else None,
               **step_timings(marks)}
    ran = [r.passes for r in results]
    counted = passes.per_worker(group.degrees)
    if ran != counted:  # the plan and the cfg-parallel degree were made for the counted passes
        log.warning("%s: the workers ran %s model passes where %s were counted (%s, %s): the memory plan and "
                    "the cfg-parallel choice assumed the counted ones", NODE, ran, counted, passes.guider,
                    passes.how)
    text = summary(group, memory, timings, load, ran, passes.describe(), streamed_model=patcher.is_dynamic())
    log.info("%s", text)
    return jobs.RunResult(samples=first.samples, x0=first.x0, memory=memory, timings=timings, model_load=load,
                          planned_peak_gib=None if est is None else jobs.gib(est.total), summary=text,
                          step_times=marks, passes=ran, counted_passes=counted,
                          planned_parts_gib=None if est is None else {k: jobs.gib(v) for k, v in est.parts.items()})


def rebuild_check(pool: Workers, group, model: model_transfer.ModelSpec) -> set[str]:
    """Before sampling: every worker rebuilds each of the model's options on its own. Those that fail
    on any worker are dropped with a warning naming them, their node packs and the error (their names
    are returned); the workers stay. (A job that cannot be rebuilt is refused by the workers before
    they sample: ``held_model.HeldModel.job_on_every_rank``.)"""
    import ray

    parts = model.check_parts()
    if not parts:
        return set()
    parts_ref = ray.put(parts)
    errors: dict[str, str] = {}
    for found in pool._wait([a.check.remote(parts_ref) for a in group.actors], "model load",
                            envs.LOAD_S.number()):
        for name, error in found.items():
            errors.setdefault(name, error)
    by_cause: dict[tuple, list] = {}
    for name, error in errors.items():
        packs = ", ".join(model_transfer.modules_of(parts[name])) or "ComfyUI"
        by_cause.setdefault((packs, error), []).append(name)
    for (packs, error), names in by_cause.items():
        log.warning("%s: dropped on the workers (%s cannot be rebuilt there: %s): %s; the run goes on without "
                    "them", NODE, packs, error, short_names(names))
    return set(errors)
