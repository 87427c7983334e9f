"""The Ray worker: one process per GPU (or CPU process), holding the model and one rank of the
sequence-parallel forward, running ComfyUI's own sampler.

Every worker runs the same sampling loop on the same inputs; only the diffusion-model forward is
split (``xdit_context_parallel``) and its output gathered, so all ranks stay in step and rank 0's
result is the answer. The model it holds, and each job's patcher rebuilt on it, are ``held_model``'s;
ComfyUI in the worker is started as in ComfyUI's process (``comfy_host``).

This module is sent to Ray workers by value (ComfyUI imports custom nodes under a path-like module
name that other processes cannot import). The pack lives under one stable package name in every
process (``ltxav_pack``: see __init__); a worker registers it first (``_register_pack``), so the
pack's modules are imported where they are used, by that name (``from . import ...`` inside the
methods: a module this one imported at its top would be pickled by reference with it, before the
worker could register the pack).
"""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
import time

import torch


def _register_pack(pack_dir: str, name: str) -> None:
    """The pack's package under ``name`` (its stable name) in this process, without running its __init__
    (node registration): its modules then import as in ComfyUI's process."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(pack_dir, "__init__.py"),
                                                      submodule_search_locations=[pack_dir])
        sys.modules[name] = importlib.util.module_from_spec(spec)


def _listen(host: str) -> socket.socket:
    """A listening TCP socket on ``host`` only (port chosen by the system)."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, 0), family=family, backlog=128)


def _gpu_id() -> int | None:
    """The GPU Ray assigned to this actor (None on CPU)."""
    import ray

    ids = ray.get_gpu_ids()
    return int(ids[0]) if ids and torch.cuda.is_available() else None


def _select_gpu() -> None:
    """Use the GPU Ray assigned to this actor. Actors see every GPU of their node
    (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES): with one visible GPU each, NCCL cannot use
    peer-to-peer / NVLink between workers and the all-to-all falls back to host memory."""
    gpu = _gpu_id()
    if gpu is not None:
        torch.cuda.set_device(gpu)  # per thread: methods that touch the GPU call this again


def backend(cuda: bool, per_gpu: int = 1) -> str:
    """The process groups' backend: NCCL between GPUs; gloo on CPU, or when workers share a GPU (NCCL
    refuses two ranks on one device)."""
    return "nccl" if cuda and per_gpu == 1 else "gloo"


def _fault(spec: str, rank: int, step: int) -> str | None:
    """The fault the test hook ``spec`` ("oom:RANK:STEP") injects at this rank and step, if any."""
    parts = spec.split(":")
    if len(parts) == 3 and int(parts[1]) == rank and int(parts[2]) == step:
        return parts[0]
    return None


class LTXAVWorker:
    """One rank. Methods run in a Ray actor with two threads: ``sample`` in one; ``progress`` and
    ``interrupt`` answer in the other while it runs."""

    def __init__(self, rank: int, world: int, comfy_path: str, pack_dir: str, pack_name: str, host_args: dict,
                 dynamic_vram: bool = False):
        """``pack_name``: the pack's stable package name (the driver's, ``ltxav_pack``); ``host_args``: the
        ComfyUI process's flags; ``dynamic_vram``: whether it runs DynamicVRAM (then this worker does too)."""
        self.rank, self.world = rank, world
        _register_pack(pack_dir, pack_name)  # before the first import of the pack's modules
        from . import comfy_host, envs, jobs, log_relay, memory_plan

        self.logs = log_relay.WorkerLogs(pack_name)  # the pack's log lines, for ComfyUI's log
        self.comfy, self.envs, self.jobs, self.plan = comfy_host, envs, jobs, memory_plan
        self.cap = envs.MEMORY_CAP_GIB.number() * jobs.GIB or None
        self.per_gpu = envs.workers_per_gpu()
        # Ray gives each actor its GPU as device 0; the ComfyUI process's own device choice does not apply
        dynamic = comfy_host.prepare(comfy_path, {**host_args, "cuda_device": None, "default_device": None},
                                     dynamic_vram and torch.cuda.is_available())
        # with DynamicVRAM the cap is a held tensor: comfy-aimdo allocates outside PyTorch's allocator
        self.held = comfy_host.start(dynamic, _gpu_id(), self.cap if dynamic else None, self.per_gpu)
        from . import ffn_chunking, held_model, instrumentation, model_transfer, parallel_kinds, video_parts
        from .sequence_parallel import groups

        self.transfer, self.groups, self.kinds = model_transfer, groups, parallel_kinds
        self.ffn, self.inst = ffn_chunking, instrumentation
        self.model = held_model.HeldModel()
        self.step = 0
        self.stop = threading.Event()
        self.busy = threading.Lock()
        self.patcher = None  # the last job's patcher (the held weights' clone with the job's options)
        self.listener = None
        self.backend = backend(torch.cuda.is_available(), self.per_gpu)  # the plan counts NCCL's buffers by it
        self.parts: dict = {}  # this rank's part of each parallel kind (parallel_kinds): new ones on regroup
        self.cpu_group = None
        self.cuda = torch.cuda.is_available()
        self.step_times: list[float] = []
        self.vae = video_parts.HeldVae()  # the video VAE a save node sent
        if self.cap and self.cuda and self.held is None:
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.cap / total))

    # -- identity and groups --------------------------------------------------
    def info(self) -> dict:
        import ray

        _select_gpu()
        name = f"{torch.cuda.get_device_name()} (cuda:{torch.cuda.current_device()})" if self.cuda else "cpu"
        ffn = None
        if self.patcher is not None:
            ffn = self.patcher.model_options.get("transformer_options", {}).get(self.ffn.CHUNKING_KEY)
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(), "device": name,
                "loads": self.model.loads, "repatches": self.model.repatches,
                "ffn_chunking": ffn, "patcher": None if self.weights is None else type(self.weights).__name__,
                "dynamic_vram": self.comfy.dynamic_vram_enabled(), "memory_flags": self.comfy.memory_flags(),
                "backend": self.backend,
                "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}

    def memory_budget(self) -> int | None:
        """Bytes this worker can use: its GPU's free memory plus what it holds already (PyTorch's cache,
        and with DynamicVRAM the weights it can page out), within the cap (``LTXAV_PARALLEL_MEMORY_CAP_GIB``);
        on CPU only the cap (None without one)."""
        _select_gpu()
        if not self.cuda:
            return int(self.cap) if self.cap else None
        free, _ = torch.cuda.mem_get_info()
        budget = free + torch.cuda.memory_reserved()
        if self.held is not None:  # the held rest of the card sits in PyTorch's cache: not this worker's
            budget -= self.held.numel()
        if self.comfy.dynamic_vram_enabled() and self.weights is not None:
            budget += self.weights.loaded_size()
        cap = self.cap
        if cap and self.held is not None:  # an emulated card: its share also holds this process's CUDA context
            cap -= self.plan.CUDA_CONTEXT_BYTES
        return int(min(budget, cap) if cap else budget)  # sharing a GPU, free counts the others' room

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: open the process-group store's socket on this node's Ray address only (127.0.0.1 in a
        local cluster) and keep it for ``init_groups``; PyTorch's own store would listen on every
        interface whatever host it is given."""
        import ray

        host = ray.util.get_node_ip_address()
        self.listener = _listen(host)
        return host, self.listener.getsockname()[1]

    def init_groups(self, host: str, port: int, degrees) -> None:
        """This rank in the process groups of ``degrees`` (``sequence_parallel.groups.Degrees``, the plan's)."""
        import torch.distributed as dist
        from torch.distributed.constants import default_pg_timeout

        _select_gpu()  # Ray runs methods in pool threads; the current CUDA device is per thread
        listen_fd = None
        if self.rank == 0:
            listen_fd, self.listener = self.listener.detach(), None  # the store owns the socket from here
        store = dist.TCPStore(host, port, self.world, is_master=self.rank == 0, timeout=default_pg_timeout,
                              master_listen_fd=listen_fd)
        self.groups.init_process_groups(self.rank, self.world, degrees, self.backend, f"tcp://{host}:{port}",
                                        store=store)
        self._parts()
        from xfuser.core.distributed.parallel_state import get_world_group

        self.cpu_group = get_world_group().cpu_group  # every rank of every group: the interrupt's agreement

    def regroup(self, degrees) -> None:
        """Other degrees on the same ranks (every rank calls it): the model stays loaded."""
        _select_gpu()
        self.groups.regroup(degrees, self.backend)
        self._parts()

    def _parts(self) -> None:
        self.parts = self.kinds.make_parts(self.rank)

    # -- model ------------------------------------------------------------------
    @property
    def weights(self):
        """The held model with its weight patches (None before the first load)."""
        return self.model.weights

    def load(self, file_key: str, key: str, recipe_bytes: bytes, spec_bytes: bytes | None):
        """``held_model.HeldModel.load``: a ``jobs.LoadResult``."""
        _select_gpu()  # Ray runs methods in pool threads; the current CUDA device is per thread
        if key != self.model.model_key:
            self.patcher = None  # the last job's patcher holds the weights that go
        return self.model.load(file_key, key, recipe_bytes, spec_bytes)

    def check(self, parts: dict) -> dict:
        """``held_model.HeldModel.check``: which of the model's options this worker cannot rebuild."""
        return self.model.check(parts)

    # -- sampling ---------------------------------------------------------------
    def progress(self) -> int:
        return self.step

    def poll(self) -> tuple[int, list]:
        """The driver's heartbeat: this worker's step and its log lines since the last poll."""
        return self.step, self.logs.take()

    def interrupt(self) -> None:
        self.stop.set()

    def _callback(self, step, x0, x, total):
        import comfy.model_management
        import torch.distributed as dist

        self.step = step + 1
        self.step_times.append(time.perf_counter())
        if self.rank == 0:
            self.last_x0 = x0
        if _fault(self.envs.FAULT.get(), self.rank, self.step) == "oom":
            raise torch.OutOfMemoryError(f"injected out-of-memory on rank {self.rank} at step {self.step} "
                                         f"({self.envs.FAULT.name})")
        # all ranks agree to stop at the same step (they are in lock-step collectives)
        flag = torch.tensor([1 if self.stop.is_set() else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.cpu_group)
        if flag.item():
            raise comfy.model_management.InterruptProcessingException()

    def sample(self, payload: bytes):
        """Run the job in ``payload`` (``model_transfer.ModelSpec.job_payload``: the model's options and a
        ``jobs.KSamplerJob`` or ``jobs.GuiderJob``); a ``jobs.SampleResult``."""
        _select_gpu()  # Ray runs methods in pool threads; the current CUDA device is per thread
        if self.weights is None:
            raise RuntimeError("no model loaded")
        if not self.busy.acquire(blocking=False):  # two jobs would interleave their collectives
            raise RuntimeError("this worker is still running the previous job")
        try:
            return self._sample(payload)
        finally:
            self.busy.release()

    def _sample(self, payload: bytes):
        import comfy.model_management

        self.step = 0
        self.step_times = [time.perf_counter()]
        self.stop.clear()
        self.last_x0 = None
        x0 = None
        patcher, job, error = self.model.job_on_every_rank(payload, self.kinds.wrappers(self.parts), self.cpu_group)
        if error:
            return self.jobs.SampleResult(interrupted=False, step=0, memory=self.memory(), error=error)
        self.patcher = patcher
        self.kinds.reset(self.parts)
        try:
            with self.inst.traced(self.rank):  # LTXAV_PARALLEL_TRACE_DIR: a profiler trace of this run
                samples = job.sample(self.patcher, self._callback)
        except comfy.model_management.InterruptProcessingException:
            return self.jobs.SampleResult(interrupted=True, step=self.step, memory=self.memory(),
                                          passes=self.kinds.report(self.parts)["passes"])
        finally:
            x0 = None if self.last_x0 is None or self.rank else self.last_x0.cpu()
            self.last_x0 = None
            comfy.model_management.soft_empty_cache()  # give cached blocks back: steady memory across prompts
        first = self.rank == 0
        return self.jobs.SampleResult(interrupted=False, step=self.step, memory=self.memory(),
                                      step_times=self.step_times, samples=samples if first else None,
                                      x0=x0 if first else None, passes=self.kinds.report(self.parts)["passes"])

    # -- video ----------------------------------------------------------------------
    def load_vae(self, key: str, data: bytes | None = None) -> bool:
        """``video_parts.HeldVae.load``: hold the video VAE ``key``."""
        _select_gpu()
        return self.vae.load(key, data)

    def decode_part(self, job_bytes: bytes, start: int, stop: int, latent=None):
        """``video_parts.HeldVae.decode``: frames [start, stop) decoded and encoded, as a Ray streaming
        generator (the caller gets an ObjectRefGenerator): each segment as soon as it is finished, then the
        ``PartResult``. It runs in one of the actor's threads, so ``poll`` answers the frames done meanwhile
        and ``interrupt`` stops it. ``latent``: the job's latent, sent apart (``PartJob.for_ray``)."""
        _select_gpu()
        if not self.busy.acquire(blocking=False):
            raise RuntimeError("this worker is still running the previous job")
        try:
            self.step = 0
            self.stop.clear()
            job = self.transfer.loads(job_bytes, {})
            yield from self.vae.decode(job if latent is None else job.with_latent(latent), (start, stop), self.stop,
                                       lambda n: setattr(self, "step", n))
        finally:
            self.busy.release()

    def memory(self):
        """This worker's ``jobs.WorkerMemory`` after a run (GPU figures None on CPU)."""
        gib, stats = self.jobs.gib, self.kinds.report(self.parts).get("stats", {})
        gpu = {}
        if self.cuda:
            gpu = {f"{name}_gib": gib(stats[name]) for name in ("peak", "pe", "blocks") if name in stats}
            held = 0 if self.held is None else self.held.numel() * self.held.element_size()
            gpu["allocated_gib"] = gib(torch.cuda.memory_allocated() - held)
            # the phase peaks reset PyTorch's counter: their record keeps the run's top
            top = max(stats.get("allocated_top", 0), torch.cuda.max_memory_allocated())
            gpu["max_allocated_gib"] = gib(top - held)
            gpu["aimdo_gib"] = self.comfy.aimdo_usage_gib()
            if self.weights is not None:  # with DynamicVRAM the rest of the weights waits in host memory
                gpu["weights_gib"] = gib(self.weights.loaded_size())
        return self.jobs.WorkerMemory(rank=self.rank, **gpu, **self.inst.host_memory(gib))
