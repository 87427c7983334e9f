"""The Ray worker: one process per GPU (or CPU process), holding the model and one rank of the
sequence-parallel forward, running ComfyUI's own sampler.

Every worker runs the same sampling loop on the same inputs; only the diffusion-model forward is
split (``xdit_context_parallel``) and its output gathered, so all ranks stay in step and rank 0's
result is the answer. The worker rebuilds the model from what ``model_transfer.model_spec`` sent:
the file is read only when the file key changes; for a changed model key (weight patches) it
clones the loaded model with the new patches, and ComfyUI's patcher restores the original weights
from its backup before applying them, as it does in its own process when a LoRA strength changes.
Each job comes with the model's options (wrappers, block patches, callbacks, object patches) in its own
pickle and samples on a fresh clone that carries them, as each sampler node's MODEL in ComfyUI is one.

This module is sent to Ray workers by value (ComfyUI imports custom nodes under a path-like module
name that other processes cannot import); it imports the rest of the pack at run time, under the
same package name as in ComfyUI, so it refers to no pack module at import time.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import os
import socket
import sys
import threading
import time
import types
import uuid

import torch

# ComfyUI's memory flags, as each worker reports them (every flag of the ComfyUI process reaches it)
MEMORY_FLAGS = ("disable_dynamic_vram", "enable_dynamic_vram", "reserve_vram", "lowvram", "novram", "highvram",
                "gpu_only", "normalvram", "cpu", "disable_smart_memory", "async_offload")


# --------------------------------------------------------------------------- worker process set-up

def _listen(host: str) -> socket.socket:
    """A listening TCP socket on ``host`` only (port chosen by the system)."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, 0), family=family, backlog=128)


def _select_gpu() -> None:
    """Use the GPU Ray assigned to this actor. Actors see every GPU of their node
    (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES): with one visible GPU each, NCCL cannot use
    peer-to-peer / NVLink between workers and the all-to-all falls back to host memory."""
    import ray

    ids = ray.get_gpu_ids()
    if ids and torch.cuda.is_available():
        torch.cuda.set_device(int(ids[0]))  # per thread: methods that touch the GPU call this again


def held_bytes(total: int, cap: float, per_gpu: int = 1) -> int:
    """Bytes each worker holds so that each of the ``per_gpu`` workers sharing a ``total``-byte GPU
    is left ``cap`` bytes (0 when the card is not larger than that)."""
    return max(0, int((total - per_gpu * cap) / per_gpu))


def _import_host(comfy_path: str, host_args: dict, dynamic_vram: bool = False, cap_bytes: float | None = None,
                 per_gpu: int = 1):
    """ComfyUI in this worker, set up as the ComfyUI process is: its command-line flags (memory flags
    included), and, when the ComfyUI process runs DynamicVRAM (``dynamic_vram``), DynamicVRAM here
    too, started the way ComfyUI's main.py starts it: comfy-aimdo before this process's first CUDA
    call, then on this worker's device, with ComfyUI's streaming ModelPatcher. Weights then stay in
    host memory and page onto the GPU as the activations leave room. ``cap_bytes``: hold the rest of
    the device (this worker's share of it, of ``per_gpu`` workers on the GPU) in a tensor first, so
    ComfyUI and its allocators see a card of that size. Returns that tensor (None without a cap on a GPU)."""
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    dynamic_vram = dynamic_vram and torch.cuda.is_available()
    if dynamic_vram:
        import comfy_aimdo.control

        comfy_aimdo.control.init()
    _select_gpu()  # before ComfyUI picks its device (the current one)
    held = None
    if cap_bytes and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        if held_bytes(total, cap_bytes, per_gpu):
            held = torch.empty(held_bytes(total, cap_bytes, per_gpu), dtype=torch.uint8,
                               device=torch.cuda.current_device())
    import comfy.cli_args

    for k, v in host_args.items():
        setattr(comfy.cli_args.args, k, v)
    # Ray gives each actor its GPU as device 0; the ComfyUI process's own device choice does not apply
    comfy.cli_args.args.cuda_device = None
    comfy.cli_args.args.default_device = None
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher

    if dynamic_vram:
        if comfy_aimdo.control.init_device(comfy.model_management.get_torch_device().index):
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
        else:
            logging.getLogger(__name__).warning("comfy-aimdo could not start on this worker's GPU: DynamicVRAM "
                                                "off here, every weight stays on the GPU")
    return held


def backend(cuda: bool, per_gpu: int = 1) -> str:
    """The process groups' backend: NCCL between GPUs; gloo on CPU, or when workers share a GPU (NCCL
    refuses two ranks on one device)."""
    return "nccl" if cuda and per_gpu == 1 else "gloo"


def dynamic_vram_enabled() -> bool:
    """Whether this process runs ComfyUI's DynamicVRAM (weights streamed from host memory)."""
    mm = sys.modules.get("comfy.memory_management")
    return bool(getattr(mm, "aimdo_enabled", False))


def _import_pack(pack_dir: str, pack_name: str) -> types.ModuleType:
    """The pack's modules, without its __init__ (node registration), under ComfyUI's package name."""
    if pack_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(pack_name, os.path.join(pack_dir, "__init__.py"),
                                                      submodule_search_locations=[pack_dir])
        sys.modules[pack_name] = importlib.util.module_from_spec(spec)
    return sys.modules[pack_name]


def _error_text(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {text}"


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
        self.rank, self.world = rank, world
        _import_pack(pack_dir, pack_name)

        def pack(name):
            return importlib.import_module(f"{pack_name}.{name}")

        self.logs = pack("log_relay").WorkerLogs(pack_name)  # the pack's log lines, for ComfyUI's log
        self.envs, self.jobs, self.transfer = pack("envs"), pack("jobs"), pack("model_transfer")
        self.plan = pack("memory_plan")
        self.cap = self.envs.MEMORY_CAP_GIB.number() * self.jobs.GIB or None
        # with DynamicVRAM the cap is a held tensor: comfy-aimdo allocates outside PyTorch's allocator
        self.per_gpu = self.envs.workers_per_gpu()
        self.held = _import_host(comfy_path, host_args, dynamic_vram, self.cap if dynamic_vram else None, self.per_gpu)
        self.models, self.groups = pack("models"), pack("sequence_parallel.groups")
        self.xsp, self.ffn, self.inst = pack("xdit_context_parallel"), pack("ffn_chunking"), pack("instrumentation")
        self.cfgp_mod = pack("cfg_parallel")
        self.pack_name = pack_name
        self.step = 0
        self.stop = threading.Event()
        self.busy = threading.Lock()
        self.base = None  # the model as read from its file: the patcher every patch set is cloned from
        self.file_key = None
        self.weights = None  # base's clone with the current weight patches: every job's patcher is cloned from it
        self.patcher = None  # the last job's patcher (weights' clone with the job's options)
        self.model_key = None
        self.loads = 0  # file reads
        self.repatches = 0  # patch sets applied to the loaded weights without reading the file
        self.listener = None
        self.backend = backend(torch.cuda.is_available(), self.per_gpu)  # the plan counts NCCL's buffers by it
        self.sp = None  # this rank's sequence-parallel part, and its CFG-parallel part: new ones on regroup
        self.cfgp = None
        self.cpu_group = None
        self.cuda = torch.cuda.is_available()
        self.step_times: list[float] = []
        self.vae = None  # the video VAE a save node sent (video_save.vae_bytes), and its key
        self.vae_key = None
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
        import comfy.cli_args

        flags = {k: getattr(comfy.cli_args.args, k, None) for k in MEMORY_FLAGS}
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(), "device": name,
                "loads": self.loads, "repatches": self.repatches, "ffn_chunking": ffn,
                "patcher": None if self.weights is None else type(self.weights).__name__,
                "dynamic_vram": dynamic_vram_enabled(), "memory_flags": flags, "backend": self.backend,
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
        if dynamic_vram_enabled() and self.weights is not None:
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
        self.sp = self.xsp.SequenceParallel(rank_label=self.rank, phase_stats=True)
        self.cfgp = self.cfgp_mod.CfgParallel()

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        """The model's DIFFUSION_MODEL wrapper: the current sequence-parallel part's."""
        return self.sp.diffusion_model_wrapper(executor, *args, **kwargs)

    def calc_cond_batch_wrapper(self, executor, *args, **kwargs):
        """The model's CALC_COND_BATCH wrapper: the current CFG-parallel part's."""
        return self.cfgp.calc_cond_batch_wrapper(executor, *args, **kwargs)

    # -- model ------------------------------------------------------------------
    def load(self, file_key: str, key: str, recipe_bytes: bytes, spec_bytes: bytes | None):
        """Hold the model ``key`` (its file and weight patches): read the file only when ``file_key``
        differs from the loaded one; otherwise clone the loaded model with the new patches (ComfyUI's
        patcher puts the original weights back from its backup before applying them). Returns a
        ``jobs.LoadResult``. The model's options come with each job (``sample``)."""
        _select_gpu()  # Ray runs methods in pool threads; the current CUDA device is per thread
        if key == self.model_key:
            return self._loaded("kept", 0.0)
        if spec_bytes is None:  # the driver sends the patches only to workers that lack this model
            raise RuntimeError("the model's patches were not sent: this worker holds another model than the "
                               "driver recorded")
        t0 = time.perf_counter()
        self.weights = self.patcher = None
        self.model_key = None
        read = file_key != self.file_key
        if read:
            self.base = None
            self.file_key = None
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
            fn, args = self.transfer.loads(recipe_bytes, {})
            self.base = fn(*args)
            self.file_key = file_key
            self.loads += 1
        else:
            self.repatches += 1
        weights = self.base.clone()
        patches = self.transfer.loads(spec_bytes, self.transfer.model_refs(weights))
        weights.patches = {k: list(v) for k, v in patches.items()}
        weights.patches_uuid = uuid.uuid4()  # a new patch set: ComfyUI's loader unpatches and patches again
        self.models.family_of(weights.model.diffusion_model, "LTXAV Parallel Sampler")
        self.weights = weights
        self.model_key = key
        return self._loaded("read" if read else "repatched", time.perf_counter() - t0)

    def check(self, parts: dict) -> dict:
        """Which of ``parts`` (name -> ``model_transfer.dumps`` pickle of one of the model's options) this
        worker cannot rebuild: name -> the error. Nothing is kept."""
        refs = self.transfer.model_refs(self.weights.clone())
        errors = {}
        for name, data in parts.items():
            try:
                self.transfer.loads(data, refs)
            except Exception as e:  # noqa: BLE001 - any failure to rebuild is reported, the option dropped
                errors[name] = _error_text(e)
        return errors

    def _job(self, payload: bytes):
        """This job's patcher (a clone of the loaded weights with the job's options, the FFN Chunker's and
        the pack's wrappers) and the job, rebuilt from one pickle: what they share stays one object."""
        import comfy.patcher_extension

        patcher = self.weights.clone()
        job = self.transfer.loads_job(payload, patcher)
        # the FFN Chunker's wrappers are the pack's own (not sent): add them again from its settings
        self.ffn.set_wrappers(patcher, self.ffn.ChunkSettings.from_options(patcher.model_options["transformer_options"])
                              is not None)
        wrappers = comfy.patcher_extension.WrappersMP
        patcher.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, self.xsp.WRAPPER_KEY, self.diffusion_model_wrapper)
        patcher.add_wrapper_with_key(wrappers.CALC_COND_BATCH, self.cfgp_mod.WRAPPER_KEY, self.calc_cond_batch_wrapper)
        return patcher, job

    def _loaded(self, action: str, seconds: float):
        return self.jobs.LoadResult(action, round(seconds, 3), self.loads, self.repatches)

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

    def _rebuilt(self, payload: bytes):
        """``_job(payload)``, or the error that stopped it; every rank learns whether all rebuilt theirs
        (a rank that samples alone would wait in its collectives)."""
        import torch.distributed as dist

        try:
            patcher, job, error = *self._job(payload), None
        except Exception as e:  # noqa: BLE001 - reported to the driver; the workers stay
            patcher = job = None
            error = _error_text(e)
        flag = torch.tensor([0 if error else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.cpu_group)
        if error is None and not flag.item():
            error = "another worker could not rebuild the job"
        return patcher, job, error

    def _sample(self, payload: bytes):
        import comfy.model_management

        self.step = 0
        self.step_times = [time.perf_counter()]
        self.stop.clear()
        self.last_x0 = None
        x0 = None
        patcher, job, error = self._rebuilt(payload)
        if error:
            return self.jobs.SampleResult(interrupted=False, step=0, memory=self.memory(), error=error)
        self.patcher = patcher
        self.sp.reset_stats()
        self.cfgp.reset()
        try:
            with self.inst.traced(self.rank):  # LTXAV_PARALLEL_TRACE_DIR: a profiler trace of this run
                samples = job.sample(self.patcher, self._callback)
        except comfy.model_management.InterruptProcessingException:
            return self.jobs.SampleResult(interrupted=True, step=self.step, memory=self.memory(),
                                          passes=self.cfgp.passes)
        finally:
            x0 = None if self.last_x0 is None or self.rank else self.last_x0.cpu()
            self.last_x0 = None
            comfy.model_management.soft_empty_cache()  # give cached blocks back: steady memory across prompts
        first = self.rank == 0
        return self.jobs.SampleResult(interrupted=False, step=self.step, memory=self.memory(),
                                      step_times=self.step_times, samples=samples if first else None,
                                      x0=x0 if first else None, passes=self.cfgp.passes)

    # -- video ----------------------------------------------------------------------
    def load_vae(self, key: str, data: bytes | None = None) -> bool:
        """Hold the video VAE ``key``, built from ``data`` (``video_save.vae_bytes``) unless held already;
        False when it is not held and no data came (the driver then sends it)."""
        _select_gpu()
        if key == self.vae_key:
            return True
        if data is None:
            return False
        self.vae = self.vae_key = None
        self.vae = importlib.import_module(f"{self.pack_name}.video_save").vae_from_bytes(data)
        self.vae_key = key
        return True

    def decode_part(self, job_bytes: bytes, start: int, stop: int):
        """Decode and encode frames [start, stop) of the pickled ``video_save.PartJob`` with the VAE held; a
        ``video_save.PartResult``. ``progress`` answers the frames done meanwhile, ``interrupt`` stops it."""
        _select_gpu()
        if self.vae is None:
            raise RuntimeError("no VAE loaded")
        if not self.busy.acquire(blocking=False):
            raise RuntimeError("this worker is still running the previous job")
        try:
            self.step = 0
            self.stop.clear()
            video_save = importlib.import_module(f"{self.pack_name}.video_save")
            return video_save.decode_part(self.vae, self.transfer.loads(job_bytes, {}), (start, stop),
                                          check=self._check_stop, progress=self._frames_done, host_memory=host_memory)
        finally:
            self.busy.release()

    def _check_stop(self) -> None:
        import comfy.model_management

        if self.stop.is_set():
            raise comfy.model_management.InterruptProcessingException()

    def _frames_done(self, n: int) -> None:
        self.step = n

    def memory(self):
        """This worker's ``jobs.WorkerMemory`` after a run (GPU figures None on CPU)."""
        gib, stats = self.jobs.gib, self.sp.stats
        gpu = {}
        if self.cuda:
            gpu = {f"{name}_gib": gib(stats[name]) for name in ("peak", "pe", "blocks") if name in stats}
            gpu["allocated_gib"] = gib(torch.cuda.memory_allocated())
            if self.weights is not None:  # with DynamicVRAM the rest of the weights waits in host memory
                gpu["weights_gib"] = gib(self.weights.loaded_size())
        return self.jobs.WorkerMemory(rank=self.rank, **gpu, **host_memory(gib))


def host_memory(gib) -> dict:
    """This process's host memory (``gib``: bytes to the unit): RSS (resident), PSS (resident, pages
    shared with other processes counted by share: a memory-mapped checkpoint read by two workers counts
    half in each) and USS (its own pages only)."""
    try:
        import psutil

        m = psutil.Process().memory_full_info()
    except Exception:  # noqa: BLE001 - no psutil, or no access: no host figures
        return {}
    return {f"host_{k}_gib": gib(getattr(m, k)) for k in ("rss", "pss", "uss") if hasattr(m, k)}
