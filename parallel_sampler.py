"""Running LTXAV sampling on Ray workers from ComfyUI: the Ray connection, the worker group (kept
alive across prompts), and one run with progress, interrupt and fault handling.

A run: connect to Ray (a private local cluster on 127.0.0.1 by default), make sure W workers exist
with process groups for the requested degrees, make sure each holds this MODEL (rebuilt from its load
recipe + patches: the file is read again only when the recipe or the file changes, changed patches
are applied to the loaded weights), send the sampling job, then watch: the progress bar follows rank
0's step, Interrupt stops every rank at the same step, and a worker that dies, fails or stops
answering ends the run with an error within seconds; the whole group is then killed (its peers would
wait in collectives forever) and the next prompt starts a new one.

The Ray connection itself (the private ``local`` cluster, joins, what a failed join says) is
``ray_cluster``'s. A cluster on loopback keeps every socket on 127.0.0.1: Ray's own processes, the
workers' process-group store, gloo's and NCCL's sockets. SIGTERM and SIGINT to ComfyUI stop the workers
and every Ray process the pack started before ComfyUI's own handling goes on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import time

import torch

from . import (
    cfg_parallel,
    envs,
    ffn_chunking,
    guidance_passes,
    instrumentation,
    jobs,
    lean_attention,
    log_relay,
    memory_plan,
    model_transfer,
    models,
    ray_cluster,
    ray_worker,
    xdit_context_parallel,
)
from .errors import clause
from .sequence_parallel.groups import Degrees, check_degrees
from .sequence_parallel.layout import ShardLayout

log = logging.getLogger(__name__)
NODE = "LTXAV Parallel Sampler"
POLL_S = 0.25
# Ray CPU slots of a local cluster: each worker takes one, and CPU workers (ComfyUI on --cpu) may outnumber
# the cores (slow, but they run)
LOCAL_CPU_SLOTS = 8
# the pack's own wrappers: not sent with the MODEL's options (each worker adds its own)
OWN_KEYS = (ffn_chunking.WRAPPER_KEY, xdit_context_parallel.WRAPPER_KEY, cfg_parallel.WRAPPER_KEY)


class WorkerFault(RuntimeError):
    """A worker died, failed or stopped answering; the group has been stopped."""


class _TaskFailed(Exception):
    def __init__(self, rank, error):
        super().__init__(rank, error)
        self.rank, self.error = rank, error


@dataclasses.dataclass(frozen=True)
class ParallelSettings:
    """The sampler nodes' parallel inputs: ``gpus`` 0 = all Ray sees; ``ulysses`` 0 = what the cfg-parallel
    degree and ``ring`` leave; ``cfg_parallel`` auto, on or off (``cfg_parallel.choose_degree``)."""

    gpus: int = 0
    ulysses: int = 0
    ring: int = 1
    ray_address: str = "local"
    cfg_parallel: str = "auto"


@dataclasses.dataclass
class _Group:
    actors: list
    world: int
    degrees: Degrees
    address: str
    cpu: bool
    infos: list
    per_gpu: int = 1  # workers sharing each GPU (envs.WORKERS_PER_GPU)
    file_key: str | None = None
    model_key: str | None = None


def _executing_node_id() -> str | None:
    from comfy_execution.utils import get_executing_context

    ctx = get_executing_context()
    return ctx.node_id if ctx is not None else None


def _cpu_mode() -> bool:
    import comfy.model_management as mm

    return mm.cpu_state == mm.CPUState.CPU or not torch.cuda.is_available()


def _host_args() -> dict:
    import comfy.cli_args

    return {k: v for k, v in vars(comfy.cli_args.args).items() if isinstance(v, (bool, int, float, str, type(None)))}


def _passthrough_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(envs.PASSTHROUGH)}


def _cause(err: BaseException) -> BaseException:
    return getattr(err, "cause", None) or err


def unit(cpu: bool) -> str:
    """What a worker is, as the messages count them."""
    return "CPU workers" if cpu else "GPUs"


class StepProgress:
    """ComfyUI's progress bar for a run on the workers, through every step in order to the last: the
    driver polls rank 0's step and may see 2, then 5 (each step passes ComfyUI's hook, and Interrupt)."""

    def __init__(self, total: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.shown = 0

    def to(self, step: int) -> None:
        import comfy.model_management

        while self.shown < step:
            self.shown += 1
            try:
                self.bar.update_absolute(self.shown)
            except comfy.model_management.InterruptProcessingException:
                # the server's progress hook raises on Interrupt and clears the flag: set it again so
                # the run's check tells the workers
                comfy.model_management.interrupt_current_processing(True)


class ParallelSampler:
    """The pack's one Ray worker group (per ComfyUI process)."""

    def __init__(self):
        self.group: _Group | None = None
        self.cluster = ray_cluster.Cluster(NODE, self.status)
        self._remote_cls = None

    def status(self, text: str) -> None:
        """Tell the user what the node is doing: on the node (ComfyUI's progress text) and in the log."""
        log.info("%s: %s", NODE, text)
        server = sys.modules.get("server")  # ComfyUI's server module, when a server runs this process
        instance = getattr(getattr(server, "PromptServer", None), "instance", None)
        node_id = _executing_node_id()
        if instance is not None and node_id is not None:
            try:
                instance.send_progress_text(text, node_id)
            except Exception:  # noqa: BLE001 - a message never stops a run (e.g. the server's loop has ended)
                log.debug("%s: progress text not sent", NODE, exc_info=True)

    # -- Ray --------------------------------------------------------------------
    @property
    def address(self) -> str | None:
        """The ``ray_address`` this process connected with (None before the first run)."""
        return self.cluster.address

    def connect(self, address: str) -> None:
        """This process in the Ray cluster ``address`` names (``ray_cluster``): once; another address later
        needs a restart (Ray cannot move a process to another cluster)."""
        address = (address or "local").strip()
        ray = sys.modules.get("ray")  # not imported before it is needed: a bad address never imports it
        connected = ray is not None and ray.is_initialized()
        if connected and self.address == address:
            return
        if address not in ("local", "auto"):  # a malformed or dead address says so first, without importing Ray
            ray_cluster.reachable(ray_cluster.target(address, NODE), NODE)
        if connected:
            raise ValueError(f"{NODE}: input 'ray_address' changed from {self.address!r} to {address!r}, but this "
                             "ComfyUI process is already part of a Ray cluster and Ray cannot move it to another "
                             "one: restart ComfyUI to use the new address, or set it back.")
        num_gpus = 0 if _cpu_mode() else torch.cuda.device_count()
        self.cluster.connect(address, num_gpus, max(os.cpu_count() or 1, LOCAL_CPU_SLOTS, num_gpus))

    def shutdown(self, why: str) -> None:
        """Stop the workers and Ray in this process; a private cluster's processes and folder too."""
        self.cluster.shutdown(why, self.stop_group)

    def _worker_class(self):
        if self._remote_cls is None:
            import ray
            from ray import cloudpickle

            cloudpickle.register_pickle_by_value(sys.modules[ray_worker.__name__])
            self._remote_cls = ray.remote(ray_worker.LTXAVWorker)
        return self._remote_cls

    # -- the worker group ---------------------------------------------------------
    def resolve(self, settings: ParallelSettings, video_heads: int, passes=1) -> tuple[int, Degrees, bool]:
        """The worker count, the degrees (cfg x Ulysses x ring) for a job of ``passes`` guidance passes
        (``guidance_passes.Passes``; an int: one call of that many a step), and whether the workers run on
        CPU."""
        import ray

        cpu = _cpu_mode()
        resources = ray.cluster_resources()
        kind = "CPU" if cpu else "GPU"
        available = int(resources.get(kind, 0)) * (1 if cpu else envs.workers_per_gpu())
        if settings.gpus < 0:
            raise ValueError(f"{NODE}: input 'gpus' is {settings.gpus}; use 0 for all GPUs or a count.")
        if cpu and settings.gpus == 0:
            raise ValueError(f"{NODE}: ComfyUI runs on the CPU, so 'gpus' counts CPU worker processes: set it "
                             "(e.g. 2); 0 (= all GPUs) has no meaning without GPUs.")
        world = settings.gpus or available
        if world < 1 or world > available:
            if cpu:
                offers = (f"offers {available} CPU slots (one a worker; more workers than this machine's "
                          f"{os.cpu_count()} cores run, slowly)") if self.address == "local" else \
                    f"has {available} CPU slots (one a worker)"
                raise ValueError(f"{NODE}: input 'gpus' asks for {world} CPU workers, but the Ray cluster at "
                                 f"{self.address!r} {offers}; use gpus <= {available}.")
            raise ValueError(f"{NODE}: input 'gpus' asks for {world} GPUs, but the Ray cluster at {self.address!r} "
                             f"has {available}; use gpus <= {available} (0 = all).")
        ring = max(1, settings.ring)
        cfg, why = cfg_parallel.choose_degree(settings.cfg_parallel, guidance_passes.Passes.of(passes), world,
                                              settings.ulysses, ring, video_heads, NODE,
                                              unit=unit(cpu))
        if settings.cfg_parallel != "off" and cfg == 1 and world > 1:
            log.info("%s: cfg-parallel not used (%s)", NODE, why)
        elif why and cfg > 1:
            log.info("%s: cfg-parallel %d: %s", NODE, cfg, why)
        if settings.ulysses == 0:
            sequence = world // cfg
            if sequence % ring:
                raise ValueError(f"{NODE}: ring_degree={ring} does not divide gpus={world}; pick a ring_degree "
                                 f"that divides {world}.")
            degrees = Degrees(sequence // ring, ring, cfg)
        else:
            degrees = Degrees(settings.ulysses, settings.ring, cfg)
        check_degrees(degrees, world, video_heads, NODE, unit=unit(cpu))
        return world, degrees, cpu

    def ensure_group(self, world, degrees, cpu) -> tuple[_Group, float]:
        import comfy.model_management

        g = self.group
        per_gpu = 1 if cpu else envs.workers_per_gpu()
        if g and (g.world, g.address, g.cpu, g.per_gpu) == (world, self.address, cpu, per_gpu):
            try:
                _heartbeat_of(g, "start")
                if g.degrees != degrees:
                    return g, self.regroup(g, degrees)
                return g, 0.0
            except (WorkerFault, _TaskFailed):  # a dead or frozen worker: start over
                log.warning("%s: a worker of the previous group is gone; starting new workers", NODE)
        self.stop_group()
        self.status(f"starting {world} workers")
        t0 = time.perf_counter()
        comfy_path = os.path.dirname(os.path.dirname(os.path.abspath(comfy.model_management.__file__)))
        pack_dir = os.path.dirname(os.path.abspath(__file__))
        resources = {"num_cpus": 1, "num_gpus": 0 if cpu else 1 / per_gpu}  # a fraction: workers share a GPU
        cls = self._worker_class()
        # actors see all GPUs of their node and pick Ray's one (ray_worker._select_gpu): NCCL needs that
        # to use NVLink / peer-to-peer between workers
        # the allocator the ComfyUI process runs (main.py picks cudaMallocAsync unless --disable-cuda-malloc):
        # comfy-aimdo pages weights out when that allocator runs short, so DynamicVRAM needs the same one
        # in the workers; without a setting, expandable segments: long videos allocate large, varying
        # blocks, and the caching allocator would fragment below what the planner (and the cap) allow
        # the pack's own variables are set explicitly ("" = unset): Ray's processes may have inherited
        # values from when Ray started
        alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "expandable_segments:True"
        env = {"env_vars": {"PYTORCH_CUDA_ALLOC_CONF": alloc,
                            **{k: "" for k in envs.WORKER_VARS}, **_passthrough_env(),
                            "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
        if self.cluster.loopback:
            # a cluster on loopback: gloo's and NCCL's own sockets there too (by default they take the
            # address the host name resolves to, or the first network interface)
            lo = ray_cluster.loopback_interface()
            env["env_vars"].update(GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)
        actors = [cls.options(max_concurrency=2, runtime_env=env, **resources).remote(
            rank, world, comfy_path, pack_dir, __package__, _host_args(), ray_worker.dynamic_vram_enabled())
            for rank in range(world)]
        group = _Group(actors, world, degrees, self.address, cpu, infos=[], per_gpu=per_gpu)
        self.group = group
        host, port = self._wait([actors[0].rendezvous.remote()], "start", envs.START_S.number(), heartbeat=False)[0]
        self._wait([a.init_groups.remote(host, port, degrees.ulysses, degrees.ring, degrees.cfg) for a in actors],
                   "start", envs.START_S.number(), heartbeat=False)
        group.infos = self._wait([a.info.remote() for a in actors], "start", envs.START_S.number(), heartbeat=False)
        seconds = time.perf_counter() - t0
        log.info("%s: started %d workers (%s) in %.1f s: %s", NODE, world, degrees.describe(), seconds,
                 ", ".join(f"{i['rank']}: {i['device']} pid {i['pid']} on {node_label(i)}" for i in group.infos))
        return group, seconds

    def regroup(self, group: _Group, degrees: Degrees) -> float:
        """The same workers (their model stays loaded) with the process groups of other degrees."""
        t0 = time.perf_counter()
        self._wait([a.regroup.remote(degrees.ulysses, degrees.ring, degrees.cfg) for a in group.actors], "start",
                   envs.START_S.number())
        seconds = time.perf_counter() - t0
        log.info("%s: regrouped %d workers from %s to %s in %.2f s (the model stays loaded)", NODE, group.world,
                 group.degrees.describe(), degrees.describe(), seconds)
        group.degrees = degrees
        return seconds

    def stop_group(self) -> None:
        """Kill the workers (frees their GPU memory); the next run starts new ones."""
        g, self.group = self.group, None
        if not g:
            return
        import ray

        for a in g.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    # -- one run ------------------------------------------------------------------
    def run(self, patcher, job: jobs.KSamplerJob | jobs.GuiderJob, settings: ParallelSettings) -> jobs.RunResult:
        """Sample ``job`` on the workers (on one local GPU: in this process, ``run_here``)."""
        import comfy.model_management
        import comfy.utils

        dm = patcher.get_model_object("diffusion_model")
        family = models.family_of(dm, NODE)
        if one_gpu_here(settings, _cpu_mode(), torch.cuda.device_count() if torch.cuda.is_available() else 0):
            return self.run_here(patcher, job)
        self.connect(settings.ray_address)  # first: it decides how Ray is imported
        import ray
        t_prepare = time.perf_counter()
        model = model_transfer.model_spec(patcher, own_keys=OWN_KEYS, node=NODE)
        if model.skipped:
            log.warning("%s: not reproduced on the workers (cannot be pickled): %s", NODE, short_names(model.skipped))
        if model.not_sent:
            log.warning("%s: not reproduced on the workers (not sent): the MODEL's %s", NODE, ", ".join(model.not_sent))
        # the passes, by a dry run of the job as the workers get it: with the MODEL's options, in one pickle
        job_bytes = model.job_payload(job)
        passes = guidance_passes.count(patcher, job, job_bytes, NODE)
        world, degrees, cpu = self.resolve(settings, family.video_heads(dm), passes)
        # before any worker starts: a worker would find it only in its first forward
        ShardLayout(latent_clip(job.latent)[0].video_tokens, degrees.sequence, 0).check(NODE, unit(cpu))
        total_steps = job.total_steps
        comfy.model_management.unload_all_models()  # GPU 0 is also a worker's: free ComfyUI's own models
        comfy.model_management.soft_empty_cache()
        prepare_s = time.perf_counter() - t_prepare

        group, start_s = self.ensure_group(world, degrees, cpu)
        budgets = self._wait([a.memory_budget.remote() for a in group.actors], "start", envs.START_S.number())
        budgets = [b for b in budgets if b is not None]
        est = None
        if budgets and not envs.SKIP_MEMORY_CHECK.on():
            try:
                est = check_memory(patcher, job.latent, group.degrees, min(budgets), group.infos, passes)
            except ValueError:
                if settings.cfg_parallel != "auto" or group.degrees.cfg == 1:
                    raise
                # auto: where the passes run one after the other, splitting each over every GPU needs less
                _, split_all, _ = self.resolve(dataclasses.replace(settings, cfg_parallel="off"),
                                               family.video_heads(dm), passes)
                est = check_memory(patcher, job.latent, split_all, min(budgets), group.infos, passes)
                log.info("%s: cfg-parallel not used (the video fits only with each pass split over all %d GPUs)",
                         NODE, world)
                self.regroup(group, split_all)
            streams = model_streams(patcher, group.infos)
            streamed = "; weights streamed from host memory (DynamicVRAM)" if streams else ""
            log.info("%s: planned peak %.2f GiB per worker of %.2f GiB free (%s; %s%s)", NODE,
                     est.total / memory_plan.GIB, min(budgets) / memory_plan.GIB, est.note, est.describe(), streamed)
        if group.file_key != model.file_key:
            self.status(f"loading the model on {world} workers")
        elif group.model_key != model.key:
            self.status(f"applying the MODEL's changed weight patches (LoRA) on {world} workers, without reading the "
                        "file again")
        t0 = time.perf_counter()
        # workers that hold this model already get no copy of its patches (a LoRA can be GBs)
        recipe_ref = ray.put(model.recipe)
        spec_ref = ray.put(model.spec) if group.model_key != model.key else None
        loads = self._wait([a.load.remote(model.file_key, model.key, recipe_ref, spec_ref) for a in group.actors],
                           "model load", envs.LOAD_S.number())
        load_s = time.perf_counter() - t0
        load = loads[0]
        action = load.action
        if action != "kept":
            log.info("%s: model %s on %d workers in %.1f s", NODE,
                     "loaded" if action == "read" else "patches re-applied", world, load_s)
        group.file_key, group.model_key = model.file_key, model.key
        dropped = self.rebuild_check(group, model)
        if dropped:  # the options no worker can rebuild stay behind (the count above included them)
            t_payload = time.perf_counter()
            job_bytes = model.job_payload(job, dropped)
            prepare_s += time.perf_counter() - t_payload
        self.status(f"sampling on {world} workers")

        t0 = time.perf_counter()
        job_ref = ray.put(job_bytes)
        progress = StepProgress(total_steps)
        results = self._wait([a.sample.remote(job_ref) for a in group.actors], "sampling", envs.STALL_S.number(),
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

    def rebuild_check(self, group: _Group, model: model_transfer.ModelSpec) -> set[str]:
        """Before sampling: every worker rebuilds each of the model's options on its own. Those that fail
        on any worker are dropped with a warning naming them, their node packs and the error (their names
        are returned); the workers stay. (A job that cannot be rebuilt is refused by the workers before
        they sample: ``LTXAVWorker._rebuilt``.)"""
        import ray

        parts = model.check_parts()
        if not parts:
            return set()
        parts_ref = ray.put(parts)
        errors: dict[str, str] = {}
        for found in self._wait([a.check.remote(parts_ref) for a in group.actors], "model load",
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

    def run_here(self, patcher, job: jobs.KSamplerJob | jobs.GuiderJob) -> jobs.RunResult:
        """Sample ``job`` in ComfyUI's process, as ComfyUI's own sampler nodes do (its model management,
        its progress bar, and with it Interrupt), after the planner's check against this GPU."""
        import comfy.utils

        self.stop_group()  # an earlier prompt's workers would hold memory on this GPU
        device = patcher.load_device
        cuda = device.type == "cuda"
        info = {"device": f"{torch.cuda.get_device_name(device)} ({device})" if cuda else str(device),
                "dynamic_vram": ray_worker.dynamic_vram_enabled() and patcher.is_dynamic()}
        est = None
        passes = guidance_passes.count(patcher, job, model_transfer.dumps_job(job, patcher, OWN_KEYS), NODE)
        if not envs.SKIP_MEMORY_CHECK.on():
            budget = here_budget(device)
            est = check_memory(patcher, job.latent, Degrees(1), budget, [info], passes)
            streamed = "; weights streamed from host memory (DynamicVRAM)" if info["dynamic_vram"] else ""
            log.info("%s: planned peak %.2f GiB of %.2f GiB free (in ComfyUI's process, one GPU; %s%s)", NODE,
                     est.total / memory_plan.GIB, budget / memory_plan.GIB, est.describe(), streamed)
        self.status("sampling in ComfyUI's process (one GPU: no workers)")
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
            with lean_attention.on(sampling):
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
        memory = [jobs.WorkerMemory(rank=0, **gpu, **ray_worker.host_memory(jobs.gib))]
        timings = {"sampling_s": round(sample_s, 2), "s_per_step": round(sample_s / max(1, job.total_steps), 4),
                   **step_timings(marks)}
        text = summary_here(info, memory[0], timings)
        log.info("%s", text)
        x0 = last.get("x0")
        return jobs.RunResult(samples=samples, x0=None if x0 is None else x0.cpu(), memory=memory, timings=timings,
                              model_load=None, planned_peak_gib=None if est is None else jobs.gib(est.total),
                              summary=text, step_times=marks, passes=[sum(passes.calls)],
                              planned_parts_gib=None if est is None else {k: jobs.gib(v) for k, v in est.parts.items()})

    def _wait(self, refs, what, stall_s, heartbeat=True, progress: StepProgress | None = None, node=NODE):
        """Results of ``refs`` (one per worker, in rank order), watching the workers meanwhile; errors
        name ``node``."""
        import comfy.model_management
        import ray

        group = self.group
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results = [None] * len(refs)
        step, moved, interrupted = 0, time.monotonic(), False
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
                for ref in done:
                    rank = pending.pop(ref)
                    try:
                        results[rank] = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        raise _TaskFailed(rank, e) from None
                if not pending:
                    break
                if heartbeat:
                    steps = _heartbeat_of(group, what)
                    if steps[0] != step:
                        step, moved = steps[0], time.monotonic()
                        if progress is not None:
                            progress.to(step)
                if time.monotonic() - moved > stall_s:
                    raise WorkerFault(f"no progress for {stall_s:.0f} s during {what} (at step {step})")
                if not interrupted and comfy.model_management.processing_interrupted():
                    interrupted = True
                    for a in group.actors:
                        a.interrupt.remote()
        except Exception as e:
            if self.cluster.stopping:  # the workers are gone because ComfyUI is stopping, not by a fault
                raise RuntimeError(f"{node}: stopped during {what}: {self.cluster.stopping}, ComfyUI is shutting "
                                   "down.") from None
            if isinstance(e, _TaskFailed):
                rank, error = _root_cause(group, e.rank, e.error)
                self.stop_group()
                raise RuntimeError(f"{node}: {_describe(error, rank, what, group)}. The workers were stopped; the "
                                   "next prompt starts new ones.") from None
            self.stop_group()
            if isinstance(e, WorkerFault):
                raise RuntimeError(f"{node}: {e}. The workers were stopped; the next prompt starts new "
                                   "ones.") from None
            raise
        except BaseException:
            self.stop_group()  # never leave workers running a job nobody waits for
            raise
        _relay_logs(group)
        return results


SHOWN_NAMES = 3  # of the options sharing a prefix (a block patch per block), the first ones a log line names


def short_names(names) -> str:
    """Option names for a log line: those that differ only in their last part (one patch per block)
    as one prefix with the first SHOWN_NAMES last parts and a count of the rest."""
    groups: dict[str, list] = {}
    for name in names:
        prefix, _, last = name.rpartition("/")
        groups.setdefault(prefix, []).append(last if prefix else name)
    out = []
    for prefix, lasts in groups.items():
        if not prefix or len(lasts) == 1:
            out += [f"{prefix}/{last}" if prefix else last for last in lasts]
            continue
        more = f" and {len(lasts) - SHOWN_NAMES} more" if len(lasts) > SHOWN_NAMES else ""
        out.append(f"{prefix}/[{', '.join(lasts[:SHOWN_NAMES])}{more}]")
    return ", ".join(out)


def node_label(info: dict) -> str:
    """A worker's node as the log names it: host name, node address and Ray's node id (nodes on one
    machine share the first two)."""
    return f"{info.get('host', '?')} ({info['node']}, Ray node {info.get('node_id', '?')[:8]})"


def one_gpu_here(settings: ParallelSettings, cpu: bool, cuda_devices: int) -> bool:
    """Whether a run samples in ComfyUI's own process: one GPU of the local cluster (``gpus`` 1, or 0 on a
    machine with one), nothing else asked of the degrees, one worker a GPU. A worker there would split
    nothing and keep its own CUDA context beside ComfyUI's on the same card (0.5 GiB: one length of
    clip less than stock ComfyUI on a 24 GiB card, measured). Off with LTXAV_PARALLEL_ONE_GPU_IN_PROCESS=0."""
    gpus = settings.gpus or (1 if cuda_devices == 1 else 0)
    return (envs.ONE_GPU_IN_PROCESS.on() and not cpu and gpus == 1 and envs.workers_per_gpu() == 1
            and (settings.ray_address or "local").strip() == "local" and settings.ulysses in (0, 1)
            and settings.ring in (0, 1) and settings.cfg_parallel != "on")


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


def summary_here(info: dict, m: jobs.WorkerMemory, timings: dict) -> str:
    """``summary``'s lines for a run in ComfyUI's process (GiB)."""
    lines = [f"{NODE}: in ComfyUI's process (one GPU: no workers); sampling {timings['sampling_s']} s "
             f"({timings.get('worker_s_per_step', timings['s_per_step'])} s/step)"]
    host = f"; host memory {m.host_rss_gib} GiB resident ({m.host_pss_gib} GiB by share)" if m.host_rss_gib else ""
    if m.allocated_gib is None:
        lines.append(f"  {info['device']}: no GPU memory figures{host}")
    else:
        streamed = " (streamed: DynamicVRAM)" if info.get("dynamic_vram") else ""
        peak = "" if m.peak_gib is None else f"peak {m.peak_gib} GiB above the sampling's start; "
        lines.append(f"  {info['device']}: {peak}{m.allocated_gib} GiB allocated; weights on the GPU "
                     f"{m.weights_gib} GiB{streamed}{host}")
    return "\n".join(lines)


def step_timings(marks: list[float]) -> dict:
    """From a worker's time marks (sampling start, then the end of each step): its median step and
    the time before the first step beyond one step (ComfyUI's set-up of the run on the worker)."""
    steps = [b - a for a, b in zip(marks[:-1], marks[1:])]
    if len(steps) < 2:
        return {}
    later = sorted(steps[1:])
    median = later[len(later) // 2]
    return {"worker_s_per_step": round(median, 4), "worker_mean_s_per_step": round(sum(later) / len(later), 4),
            "worker_setup_s": round(max(0.0, steps[0] - median), 3)}


def latent_clip(latent) -> tuple[memory_plan.Clip, int]:
    """The planner's view of a sampler's latent (video, or video + audio): its clip and batch size."""
    parts = latent.unbind() if getattr(latent, "is_nested", False) else [latent]
    video = parts[0]
    audio = parts[1].shape[2] if len(parts) > 1 else 0
    return memory_plan.Clip(video.shape[2], video.shape[3], video.shape[4], audio), video.shape[0]


def streams_weights(infos) -> bool:
    """Whether the workers (their ``info()``) run ComfyUI's DynamicVRAM: weights streamed from host memory."""
    return any(i.get("dynamic_vram") for i in infos)


def model_streams(patcher, infos) -> bool:
    """Whether ``patcher``'s weights stream from host memory on the workers (``infos``): they run DynamicVRAM
    and its patcher is ComfyUI's streaming one (ComfyUI-GGUF's is not: its model loads whole, or partly as
    ComfyUI's lowvram mode loads it)."""
    return streams_weights(infos) and patcher.is_dynamic()


def passes_per_forward(patcher, clip: memory_plan.Clip, batch: int, share: int, budget: float) -> int:
    """Guidance passes one worker's forward holds. ComfyUI's calc_cond_batch batches a step's passes (with
    CFG-parallel, the group's ``share`` of them) into one forward when its own estimate for the batch
    (``BaseModel.memory_required`` of the packed latent, times 1.5) is below the free memory, else the
    largest part of them that is (n, n // 2, ...), else one: that choice, with ``budget`` as the free memory."""
    elements = 128 * (clip.video_tokens + clip.audio_tokens)  # video [B,128,F,H,W] and audio [B,8,T,16], packed
    for i in range(1, share + 1):
        k = share // i
        if patcher.model.memory_required([k * batch, 1, elements]) * 1.5 < budget:
            return k
    return 1


def plan_setting(degrees: Degrees, passes, per_forward: int) -> str:
    """The degrees and the passes a forward holds, as the planner's log line and refusal say them."""
    return f"{degrees.describe()}; {passes.describe()}, {per_forward} in each worker's forward"


def check_memory(patcher, latent, degrees, budget, infos=(), passes=1) -> memory_plan.Estimate:
    """Refuse a run on ``latent`` whose predicted per-worker peak exceeds ``budget`` bytes, saying what
    would fit. ``passes``: the job's guidance passes (``guidance_passes.Passes``; an int: one call of that
    many a step): a worker's forward holds its share of the largest call."""
    dm = patcher.get_model_object("diffusion_model")
    family = models.family_of(dm, NODE)
    dims = family.plan_dims(dm, compute_dtype=patcher.model.get_dtype_inference())
    clip, batch = latent_clip(latent)
    chunking = ffn_chunking.ChunkSettings.from_options(patcher.model_options.get("transformer_options"))
    ffn = 1 if chunking is None else None if chunking.auto else chunking.num_chunks  # None: auto
    # per-token timesteps (image-to-video, guides) come from the conditioning too: always count them;
    # workers that stream the weights keep only the blocks in use on the GPU
    streaming = model_streams(patcher, infos)
    passes = guidance_passes.Passes.of(passes)
    share = passes.largest_share(degrees.cfg)  # the wrapper's split of the largest call
    per_forward = passes_per_forward(patcher, clip, batch, share, budget)
    # NCCL's buffers: one set per peer the worker exchanges with (gloo's stay in host memory)
    nccl_peers = degrees.world - 1 if any(i.get("backend") == "nccl" for i in infos) else 0
    kw = dict(ring=degrees.ring, ffn_chunks=ffn, sampler=True, batch=batch * per_forward, per_token_timesteps=True,
              streaming=streaming, lean=lean_attention.enabled(), nccl_peers=nccl_peers)
    sequence = degrees.sequence
    est = memory_plan.estimate(dims, clip, world=sequence, **kw)
    gib = memory_plan.GIB
    if est.total <= budget:
        if budget - est.total < memory_plan.EDGE_BYTES:
            log.warning("%s: the plan (%.2f GiB) leaves %.2f GiB of the %.2f GiB free: at the card's edge, where "
                        "clips ran out of memory in stock ComfyUI too (the allocator's pool comes on top); if "
                        "this one does, shorten input 'latent_image' or raise input 'gpus'", NODE,
                        est.total / gib, (budget - est.total) / gib, budget / gib)
        return dataclasses.replace(est, note=plan_setting(degrees, passes, per_forward))
    size = f"{clip.latent_width * 32}x{clip.latent_height * 32}"
    fits = 0  # the longest length that fits with as many passes a forward as ComfyUI would batch there
    for k in sorted({share // i for i in range(1, share + 1)}):
        longest = memory_plan.largest_latent_frames(budget, dims, clip, world=sequence, **{**kw, "batch": batch * k})
        if longest and passes_per_forward(patcher, clip.with_latent_frames(longest), batch, share, budget) <= k:
            fits = max(fits, longest)
    ulysses_only = {k: v for k, v in kw.items() if k != "ring"}
    more = memory_plan.smallest_world(budget, dims, clip, max_world=64, video_heads=family.video_heads(dm),
                                      **ulysses_only)
    device = infos[0]["device"] if infos else "each worker"
    if fits:
        advice = [f"at {size} with {degrees.world} GPUs the longest video that fits is {(fits - 1) * 8 + 1} frames"]
    else:
        fixed = est.parts["weights"] + est.parts["weight casts"] + est.parts["fixed"]
        what = "the weights ComfyUI keeps on the GPU while streaming the rest" if streaming else "the weights"
        advice = [f"{what} and fixed buffers alone take {fixed / gib:.2f} GiB: use fp8 weights, GPUs with more "
                  "memory, or free memory on them"]
    if more:
        cfg = f"cfg-parallel {degrees.cfg} x " if degrees.cfg > 1 else ""
        advice.append(f"{clip.frames} frames need gpus={more * degrees.cfg} ({cfg}ulysses_degree={more})")
    if ffn == 1:
        with_chunker = memory_plan.estimate(dims, clip, world=sequence, **{**kw, "ffn_chunks": None})
        if with_chunker.total <= budget:
            advice.append("or add the LTX FFN Chunker before this node")
    raise ValueError(f"{NODE}: a {clip.frames}-frame {size} video needs about {est.total / gib:.2f} GiB per worker "
                     f"({plan_setting(degrees, passes, per_forward)}: {est.describe()}), but {device} has "
                     f"{budget / gib:.2f} GiB for it; " + "; ".join(advice)
                     + ". Shorten input 'latent_image' or raise input 'gpus'.")


def _heartbeat_of(group, what):
    """Every worker's step, answered by its second thread (its log lines since the last poll go to this
    process's log); raises for a dead or silent worker."""
    import ray

    refs = [a.poll.remote() for a in group.actors]
    heartbeat_s = envs.HEARTBEAT_S.number()
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=heartbeat_s)
    steps = []
    for rank, ref in enumerate(refs):
        if ref not in ready:
            raise WorkerFault(f"worker {rank} stopped answering for {heartbeat_s:.0f} s during {what} "
                              "(hung, frozen or overloaded)")
        try:
            step, lines = ray.get(ref)
        except ray.exceptions.RayError as e:
            raise _TaskFailed(rank, e) from None
        log_relay.replay(rank, lines)
        steps.append(step)
    return steps


def _relay_logs(group) -> None:
    """The workers' log lines not yet taken (a wait's last ones), as far as they answer within 2 s."""
    import ray

    refs = [a.poll.remote() for a in group.actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
    for rank, ref in enumerate(refs):
        if ref in ready:
            with contextlib.suppress(ray.exceptions.RayError):
                log_relay.replay(rank, ray.get(ref)[1])


def _root_cause(group, rank, error):
    """When one worker dies its peers fail too (their collectives lose a member): name the dead one."""
    import ray

    if isinstance(error, ray.exceptions.RayActorError):
        return rank, error
    refs = [a.progress.remote() for a in group.actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
    for r, ref in enumerate(refs):
        if ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                return r, e
    return rank, error


def _describe(err, rank, what, group) -> str:
    import ray

    cause = _cause(err)
    device = group.infos[rank]["device"] if group and len(group.infos) > rank else "its device"
    who = f"worker {rank} ({device})"
    if isinstance(err, ray.exceptions.RayActorError):
        log.warning("%s: %s died: %s", NODE, who, str(err)[:2000])
        return f"{who} died during {what} (its process was killed, crashed, or ran out of host memory)"
    if isinstance(cause, torch.OutOfMemoryError) or "OutOfMemoryError" in type(cause).__name__:
        return (f"{who} ran out of GPU memory during {what}: {clause(cause, 300).partition(': ')[2]}. Use more "
                "GPUs, the LTX FFN Chunker, or a shorter or smaller video")
    return f"{who} failed during {what}: {clause(cause)}"


MODEL_ACTIONS = {"read": "read from file", "repatched": "patches re-applied, file not read", "kept": "kept"}


def summary(group: _Group, memory: list[jobs.WorkerMemory], timings: dict, load: jobs.LoadResult | None = None,
            passes: list[int] | None = None, guidance: str = "", streamed_model: bool = True) -> str:
    """The time and per-worker memory lines shown in the log and on the node (GiB); ``passes``: the
    model passes each worker evaluated; ``guidance``: the job's passes (``guidance_passes.Passes.describe``);
    ``streamed_model``: the model's patcher streams its weights where the workers run DynamicVRAM (not
    ComfyUI-GGUF's)."""
    loading = f"model load {timings['model_load_s']} s"
    if load:
        loading += (f" ({MODEL_ACTIONS[load.action]}; file reads {load.loads}, patch changes {load.repatches} on "
                    "these workers)")
    lines = [f"{NODE}: {group.world} workers, {group.degrees.describe()}; {guidance + '; ' if guidance else ''}"
             f"sampling {timings['sampling_s']} s ({timings.get('worker_s_per_step', timings['s_per_step'])} s/step on "
             f"the workers), {loading}, Ray start {timings['ray_start_s']} s"]
    passes = passes or [None] * len(memory)
    for m, info, n in zip(memory, group.infos, passes):
        host = f"; host memory {m.host_rss_gib} GiB resident ({m.host_pss_gib} GiB by share)" if m.host_rss_gib else ""
        host += f"; {n} model passes" if n is not None else ""
        if m.peak_gib is None:
            lines.append(f"  worker {m.rank} ({info['device']}): no GPU memory figures on CPU{host}")
        else:
            streamed = " (streamed: DynamicVRAM)" if info.get("dynamic_vram") and streamed_model else ""
            lines.append(f"  worker {m.rank} ({info['device']}): peak {m.peak_gib} GiB above the forward's start "
                         f"(PE {m.pe_gib} GiB, blocks {m.blocks_gib} GiB); {m.allocated_gib} GiB allocated; "
                         f"weights on the GPU {m.weights_gib} GiB{streamed}{host}")
    return "\n".join(lines)


POOL = ParallelSampler()


def install_signal_handlers() -> None:
    """On SIGTERM and SIGINT, stop the workers and the Ray processes the pack started, then go on as
    before (ComfyUI's Ctrl-C handling, or the default: the process ends). Ray sets its own SIGTERM
    handler only when ray.init runs in the main thread, and ComfyUI runs nodes in another one, so
    without this a SIGTERM leaves Ray's processes behind. Call from the main thread (ComfyUI loads
    custom nodes there)."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("%s: not in the main thread: SIGTERM/SIGINT will not stop Ray's processes", NODE)
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if previous == signal.SIG_IGN or getattr(previous, "func", None) is _on_signal:
            continue  # ignored on purpose (ComfyUI goes on), or installed already (the pack loaded twice)
        signal.signal(sig, functools.partial(_on_signal, previous))


def _on_signal(previous, signum, frame):
    POOL.shutdown(f"{signal.Signals(signum).name} received")
    if callable(previous):
        return previous(signum, frame)
    # SIG_DFL, or a handler set outside Python (None): the default action ends the process, as
    # without the pack
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return None
