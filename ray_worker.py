"""The Ray worker: one process per GPU (or CPU process), holding the model and one rank of the
sequence-parallel forward, running ComfyUI's own sampler.

Every worker runs the same sampling loop on the same inputs; only the diffusion-model forward is
split (``xdit_context_parallel``) and its output gathered, so all ranks stay in step and rank 0's
result is the answer.

What crosses from ComfyUI to the workers is pickled with ``dumps``: anything that refers to the
driver's MODEL (its ModelPatcher, model_options, BaseModel or diffusion model) is sent as a
reference and resolves to the worker's own copy, so guiders and model options travel without the
weights. The worker rebuilds the model from the MODEL's load recipe (``cached_patcher_init``, set by
ComfyUI's loaders), then applies the MODEL's weight patches (LoRA), object patches and options.
Two keys, made from content (``content_digest``), decide what a worker redoes: the file key (the
recipe: file, dtype, loader options; and the file's size and time) rebuilds the model from disk; the
model key (file key + patches, object patches, options) only makes a new clone of the loaded model
with the new patches, and ComfyUI's patcher restores the original weights from its backup before
applying them, as it does in its own process when a LoRA strength changes.

This module is sent to Ray workers by value (ComfyUI imports custom nodes under a path-like module
name that other processes cannot import); it imports the rest of the pack at run time, under the
same package name as in ComfyUI.
"""
from __future__ import annotations

import enum
import functools
import gc
import hashlib
import importlib
import importlib.util
import io
import logging
import os
import pickle
import socket
import sys
import threading
import time
import types
import uuid
import weakref

import torch

ENV_PASSTHROUGH = ("LTXAV_PARALLEL_", "NCCL_", "GLOO_", "TORCH_SYMM_MEM_", "NVSHMEM_", "LOG_LEVEL")
FAULT_ENV = "LTXAV_PARALLEL_FAULT"  # test hook: "oom:RANK:STEP" raises an OutOfMemoryError there
# cap each worker's device memory (GB = 10^9 bytes), e.g. 24 to behave like a 24 GB card on a larger one
CAP_ENV = "LTXAV_PARALLEL_MEMORY_CAP_GB"
WORKER_ENV = (FAULT_ENV, CAP_ENV)  # read by the workers themselves
# ComfyUI's memory flags, as each worker reports them (every flag of the ComfyUI process reaches it)
MEMORY_FLAGS = ("disable_dynamic_vram", "enable_dynamic_vram", "reserve_vram", "lowvram", "novram", "highvram",
                "gpu_only", "normalvram", "cpu", "disable_smart_memory", "async_offload")
MODEL_REF_NAMES = ("patcher", "model_options", "base_model", "diffusion_model")


# --------------------------------------------------------------------------- transfer

def model_refs(patcher) -> dict:
    """The objects that stand for the model in anything sent to workers."""
    return {"patcher": patcher, "model_options": patcher.model_options, "base_model": patcher.model,
            "diffusion_model": patcher.model.diffusion_model}


def dumps(obj, refs: dict) -> bytes:
    """cloudpickle ``obj``, sending the objects in ``refs`` by name."""
    from ray import cloudpickle

    by_id = {id(v): k for k, v in refs.items()}

    class RefPickler(cloudpickle.Pickler):
        def persistent_id(self, o):
            return by_id.get(id(o))

    buf = io.BytesIO()
    RefPickler(buf, protocol=5).dump(obj)
    return buf.getvalue()


def loads(data: bytes, refs: dict):
    """Inverse of ``dumps``: names resolve to the objects in ``refs``."""

    class RefUnpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            return refs[pid]

    return RefUnpickler(io.BytesIO(data)).load()


class ModelSpec(types.SimpleNamespace):
    """What a worker needs to rebuild a MODEL: ``recipe`` and ``spec`` (pickled), ``skipped`` (the names
    of the parts that cannot travel), ``file_key`` (what decides the weights read from disk) and
    ``key`` (that plus everything applied on them)."""


def model_spec(patcher, own_keys=()) -> ModelSpec:
    """What a worker needs to rebuild ``patcher``'s model: its load recipe, its patches and options
    (pickled with model references), the names of the parts that cannot travel (left out), and the
    content keys that decide whether a worker reloads the file or only re-applies patches."""
    from ray import cloudpickle

    if patcher.cached_patcher_init is None:
        raise ValueError("the MODEL has no load recipe (ComfyUI records one in UNETLoader 'Load Diffusion "
                         "Model' and CheckpointLoaderSimple 'Load Checkpoint'); load the model with one of those")
    refs = model_refs(patcher)
    skipped = []

    def keep(name, value):
        try:
            dumps(value, refs)
            return True
        except Exception:  # noqa: BLE001 - anything unpicklable stays behind, named in the warning
            skipped.append(name)
            return False

    options = {}
    for k, v in patcher.model_options.items():
        if k == "transformer_options":
            continue
        if keep(f"model_options[{k!r}]", v):
            options[k] = v
    to = {}
    for k, v in patcher.model_options.get("transformer_options", {}).items():
        if k == "wrappers":
            continue
        if keep(f"transformer_options[{k!r}]", v):
            to[k] = v
    wrappers = {}
    for kind, by_key in patcher.wrappers.items():
        for key, fns in by_key.items():
            if key in own_keys:
                continue
            if keep(f"wrapper {kind}/{key}", fns):
                wrappers.setdefault(kind, {})[key] = list(fns)
    object_patches = {k: v for k, v in patcher.object_patches.items() if keep(f"object patch {k!r}", v)}
    spec = {"patches": {k: list(v) for k, v in patcher.patches.items()}, "object_patches": object_patches,
            "model_options": options, "transformer_options": to, "wrappers": wrappers}
    recipe = patcher.cached_patcher_init
    file_key = content_digest({"recipe": recipe, "files": _file_stats(recipe[1])})
    key = content_digest({"file": file_key, "spec": spec}, refs)
    return ModelSpec(recipe=cloudpickle.dumps(recipe), spec=dumps(spec, refs), skipped=skipped, file_key=file_key,
                     key=key)


def _file_stats(args) -> list:
    """Size and modification time of the files a load recipe names: a file replaced under the same
    name is read again."""
    out = []
    for a in args:
        if isinstance(a, str) and os.path.isfile(a):
            st = os.stat(a)
            out.append((a, st.st_size, st.st_mtime_ns))
        elif isinstance(a, (list, tuple)):
            out.extend(_file_stats(a))
    return out


def content_digest(obj, refs: dict | None = None) -> str:
    """A hash of what ``obj`` holds (tensor bytes, numbers, strings, the attributes of objects), not of
    where it lives: the same LoRA loaded twice gives the same digest, a changed strength another.
    The objects in ``refs`` count by name. What cannot be read this way (no attributes, no pickle)
    counts by identity, so at worst a worker re-applies patches it could have kept."""
    h = hashlib.blake2b(digest_size=16)
    names = {id(v): k for k, v in (refs or {}).items()}
    seen: dict[int, tuple[int, object]] = {}  # id -> (position, the object: kept alive so ids stay unique)

    def put(tag: bytes, data: bytes = b"") -> None:
        h.update(tag + len(data).to_bytes(8, "little") + data)

    def walk(o) -> None:
        if id(o) in names:
            return put(b"ref", names[id(o)].encode())
        if o is None or isinstance(o, (bool, int, float, complex, str, enum.Enum, torch.dtype, torch.device)):
            return put(type(o).__name__.encode(), repr(o).encode())
        if isinstance(o, (bytes, bytearray)):
            return put(b"bytes", bytes(o))
        if id(o) in seen:  # shared or cyclic: its position, once it was read
            return put(b"seen", str(seen[id(o)][0]).encode())
        seen[id(o)] = (len(seen), o)
        if isinstance(o, torch.Tensor):
            return tensor(o)
        if isinstance(o, (list, tuple)):
            put(type(o).__qualname__.encode(), str(len(o)).encode())
            for x in o:
                walk(x)
            return None
        if isinstance(o, dict):
            put(b"dict", str(len(o)).encode())
            for k in sorted(o, key=repr):
                walk(k)
                walk(o[k])
            return None
        if isinstance(o, (set, frozenset)):
            return put(b"set", b"".join(sorted(bytes.fromhex(content_digest(x, refs)) for x in o)))
        if isinstance(o, functools.partial):
            put(b"partial")
            return walk((o.func, o.args, o.keywords))
        if isinstance(o, types.MethodType):
            put(b"method", o.__func__.__qualname__.encode())
            return walk(o.__self__)
        if isinstance(o, types.FunctionType):
            put(b"function", f"{o.__module__}.{o.__qualname__}".encode())
            return walk((o.__code__, o.__defaults__, o.__kwdefaults__,
                         [c.cell_contents for c in o.__closure__ or () if _cell_set(c)]))
        if isinstance(o, types.CodeType):
            put(b"code", o.co_code)
            return walk((o.co_consts, o.co_names))
        if isinstance(o, (type, types.BuiltinFunctionType, types.ModuleType)):
            put(b"name", f"{getattr(o, '__module__', '')}.{getattr(o, '__qualname__', o.__name__)}".encode())
            bound = getattr(o, "__self__", None)  # a builtin method: the object it is bound to counts
            return None if bound is None or isinstance(bound, types.ModuleType) else walk(bound)
        state = _attributes(o)
        if state is not None:
            put(b"object", f"{type(o).__module__}.{type(o).__qualname__}".encode())
            return walk(state)
        try:
            return put(b"pickle", pickle.dumps(o))
        except Exception:  # noqa: BLE001 - unreadable: identity (a change forces re-applying, never a wrong reuse)
            return put(b"id", f"{type(o).__qualname__}:{id(o)}:{uuid.uuid4()}".encode())

    def tensor(t: torch.Tensor) -> None:
        put(b"tensor", f"{type(t).__qualname__}:{t.dtype}:{tuple(t.shape)}".encode())
        try:
            put(b"data", _tensor_bytes_digest(t))
        except Exception:  # noqa: BLE001 - quantized or subclassed tensors without plain bytes
            state = _attributes(t)
            if state:
                walk(state)
            else:
                put(b"id", f"{id(t)}:{uuid.uuid4()}".encode())

    try:
        walk(obj)
    except RecursionError:  # too deep to read: a key of its own (patches are re-applied, never wrongly kept)
        return uuid.uuid4().hex
    return h.hexdigest()


# tensor id -> (weak reference, version, data pointer, digest of its bytes): a LoRA's tensors stay the
# same objects from prompt to prompt (ComfyUI caches the loader's output), so their bytes are hashed
# once; an in-place change bumps the version, and a dead tensor's entry goes with it
_TENSOR_DIGESTS: dict[int, tuple] = {}


def _tensor_bytes_digest(t: torch.Tensor) -> bytes:
    state = (t._version, t.data_ptr())
    hit = _TENSOR_DIGESTS.get(id(t))
    if hit is not None and hit[0]() is t and hit[1:3] == state:
        return hit[3]
    data = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
    digest = hashlib.blake2b(memoryview(data.numpy()), digest_size=16).digest()
    key = id(t)
    _TENSOR_DIGESTS[key] = (weakref.ref(t, lambda _, key=key: _TENSOR_DIGESTS.pop(key, None)), *state, digest)
    return digest


def _cell_set(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
        return True
    except ValueError:
        return False


def _attributes(o) -> dict | None:
    """An object's own state: its __dict__ and __slots__ values (None when it has neither)."""
    state = dict(vars(o)) if hasattr(o, "__dict__") else {}
    for cls in type(o).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in ("__dict__", "__weakref__") and hasattr(o, name):
                state[name] = getattr(o, name)
    if not state and not hasattr(o, "__dict__"):
        return None
    return state


# --------------------------------------------------------------------------- worker process set-up

def _free_port() -> int:
    """A free port on loopback (for single-process runs; workers use ``LTXAVWorker.rendezvous``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _import_host(comfy_path: str, host_args: dict, dynamic_vram: bool = False, cap_bytes: float | None = None):
    """ComfyUI in this worker, set up as the ComfyUI process is: its command-line flags (memory flags
    included), and, when the ComfyUI process runs DynamicVRAM (``dynamic_vram``), DynamicVRAM here
    too, started the way ComfyUI's main.py starts it: comfy-aimdo before this process's first CUDA
    call, then on this worker's device, with ComfyUI's streaming ModelPatcher. Weights then stay in
    host memory and page onto the GPU as the activations leave room. ``cap_bytes``: hold the rest of
    the device in a tensor first, so ComfyUI and its allocators see a card of that size. Returns that
    tensor (None without a cap on a GPU)."""
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
        if total > cap_bytes:
            held = torch.empty(int(total - cap_bytes), dtype=torch.uint8, device=torch.cuda.current_device())
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


def _fault(rank: int, step: int) -> str | None:
    spec = os.environ.get(FAULT_ENV, "")
    parts = spec.split(":")
    if len(parts) == 3 and int(parts[1]) == rank and int(parts[2]) == step:
        return parts[0]
    return None


def _gb(n: float) -> float:
    return round(n / (1 << 30), 3)


class LTXAVWorker:
    """One rank. Methods run in a Ray actor with two threads: ``sample`` in one; ``progress`` and
    ``interrupt`` answer in the other while it runs."""

    def __init__(self, rank: int, world: int, comfy_path: str, pack_dir: str, pack_name: str, host_args: dict,
                 dynamic_vram: bool = False):
        self.rank, self.world = rank, world
        cap = float(os.environ.get(CAP_ENV) or 0) * 1e9
        self.cap = cap or None
        # with DynamicVRAM the cap is a held tensor: comfy-aimdo allocates outside PyTorch's allocator
        self.held = _import_host(comfy_path, host_args, dynamic_vram, self.cap if dynamic_vram else None)
        self.pack_name = pack_name
        _import_pack(pack_dir, pack_name)
        self.xsp = importlib.import_module(f"{pack_name}.xdit_context_parallel")
        self.ffn = importlib.import_module(f"{pack_name}.ffn_chunking")
        self.inst = importlib.import_module(f"{pack_name}.instrumentation")
        self.step = 0
        self.stop = threading.Event()
        self.busy = threading.Lock()
        self.base = None  # the model as read from its file: the patcher every patch set is cloned from
        self.file_key = None
        self.patcher = None  # base's clone with the current patches, object patches and options
        self.model_key = None
        self.loads = 0  # file reads
        self.repatches = 0  # patch sets applied to the loaded weights without reading the file
        self.listener = None
        self.sp = None
        self.cpu_group = None
        self.cuda = torch.cuda.is_available()
        self.step_times: list[float] = []
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
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(), "device": name,
                "loads": self.loads, "repatches": self.repatches, "ffn_chunking": ffn,
                "dynamic_vram": dynamic_vram_enabled(), "memory_flags": flags}

    def memory_budget(self) -> int | None:
        """Bytes this worker can use: its GPU's free memory plus what it holds already (PyTorch's cache,
        and with DynamicVRAM the weights it can page out), within the cap (``LTXAV_PARALLEL_MEMORY_CAP_GB``);
        on CPU only the cap (None without one)."""
        if not self.cuda:
            return int(self.cap) if self.cap else None
        free, _ = torch.cuda.mem_get_info()
        budget = free + torch.cuda.memory_reserved()
        if self.held is not None:  # the held rest of the card sits in PyTorch's cache: not this worker's
            budget -= self.held.numel()
        if dynamic_vram_enabled() and self.patcher is not None:
            budget += self.patcher.loaded_size()
        return int(min(budget, self.cap) if self.cap and self.held is None else budget)

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: open the process-group store's socket on this node's Ray address only (127.0.0.1 in a
        local cluster) and keep it for ``init_groups``; PyTorch's own store would listen on every
        interface whatever host it is given."""
        import ray

        host = ray.util.get_node_ip_address()
        self.listener = _listen(host)
        return host, self.listener.getsockname()[1]

    def init_groups(self, host: str, port: int, ulysses: int, ring: int) -> None:
        import torch.distributed as dist
        from torch.distributed.constants import default_pg_timeout

        _select_gpu()  # Ray runs methods in pool threads; the current CUDA device is per thread
        backend = "nccl" if self.cuda else "gloo"
        listen_fd = None
        if self.rank == 0:
            listen_fd, self.listener = self.listener.detach(), None  # the store owns the socket from here
        store = dist.TCPStore(host, port, self.world, is_master=self.rank == 0, timeout=default_pg_timeout,
                              master_listen_fd=listen_fd)
        self.xsp.init_process_groups(self.rank, self.world, self.xsp.Degrees(ulysses, ring), backend,
                                     f"tcp://{host}:{port}", store=store)
        self.sp = self.xsp.SequenceParallel(rank_label=self.rank, phase_stats=True)
        from xfuser.core.distributed.parallel_state import get_sp_group

        self.cpu_group = get_sp_group().cpu_group

    # -- model ------------------------------------------------------------------
    def load(self, file_key: str, key: str, recipe_bytes: bytes, spec_bytes: bytes) -> dict:
        """Hold the model ``key``: read the file only when ``file_key`` differs from the loaded one;
        otherwise clone the loaded model with the new patches (ComfyUI's patcher puts the original
        weights back from its backup before applying them). Returns what was done, how long it took,
        and this worker's counts of file reads and patch changes."""
        _select_gpu()  # Ray runs methods in pool threads; the current CUDA device is per thread
        if key == self.model_key:
            return self._loaded("kept", 0.0)
        t0 = time.perf_counter()
        self.patcher = None
        self.model_key = None
        read = file_key != self.file_key
        if read:
            self.base = None
            self.file_key = None
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
            fn, args = pickle.loads(recipe_bytes)
            self.base = fn(*args)
            self.file_key = file_key
            self.loads += 1
        else:
            self.repatches += 1
        import comfy.patcher_extension

        patcher = self.base.clone()
        spec = loads(spec_bytes, model_refs(patcher))
        patcher.patches = {k: list(v) for k, v in spec["patches"].items()}
        patcher.patches_uuid = uuid.uuid4()  # a new patch set: ComfyUI's loader unpatches and patches again
        for k, v in spec["object_patches"].items():
            patcher.add_object_patch(k, v)
        patcher.model_options.update(spec["model_options"])
        patcher.model_options.setdefault("transformer_options", {}).update(spec["transformer_options"])
        for kind, by_key in spec["wrappers"].items():
            for key_, fns in by_key.items():
                for fn_ in fns:
                    patcher.add_wrapper_with_key(kind, key_, fn_)
        # the FFN Chunker's wrappers are the pack's own (not sent): add them again from its settings
        self.ffn.set_wrappers(patcher, self.ffn.ChunkSettings.from_options(patcher.model_options["transformer_options"])
                              is not None)
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, self.xsp.WRAPPER_KEY,
                                     self.sp.diffusion_model_wrapper)
        self.xsp.require_ltxav(patcher.model.diffusion_model, "LTXAV Parallel Sampler")
        self.patcher = patcher
        self.model_key = key
        return self._loaded("read" if read else "repatched", time.perf_counter() - t0)

    def _loaded(self, action: str, seconds: float) -> dict:
        return {"action": action, "seconds": round(seconds, 3), "loads": self.loads, "repatches": self.repatches}

    # -- sampling ---------------------------------------------------------------
    def progress(self) -> int:
        return self.step

    def interrupt(self) -> None:
        self.stop.set()

    def _callback(self, step, x0, x, total):
        import comfy.model_management
        import torch.distributed as dist

        self.step = step + 1
        self.step_times.append(time.perf_counter())
        if self.rank == 0:
            self.last_x0 = x0
        if _fault(self.rank, self.step) == "oom":
            raise torch.OutOfMemoryError(f"injected out-of-memory on rank {self.rank} at step {self.step} "
                                         f"({FAULT_ENV})")
        # all ranks agree to stop at the same step (they are in lock-step collectives)
        flag = torch.tensor([1 if self.stop.is_set() else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.cpu_group)
        if flag.item():
            raise comfy.model_management.InterruptProcessingException()

    def sample(self, job_bytes: bytes) -> dict:
        _select_gpu()  # Ray runs methods in pool threads; the current CUDA device is per thread
        if self.patcher is None:
            raise RuntimeError("no model loaded")
        if not self.busy.acquire(blocking=False):  # two jobs would interleave their collectives
            raise RuntimeError("this worker is still running the previous job")
        try:
            return self._sample(job_bytes)
        finally:
            self.busy.release()

    def _sample(self, job_bytes: bytes) -> dict:
        import comfy.model_management
        import comfy.sample

        self.step = 0
        self.step_times = [time.perf_counter()]
        self.stop.clear()
        self.last_x0 = None
        x0 = None
        job = loads(job_bytes, model_refs(self.patcher))
        self.sp.reset_stats()
        try:
            with self.inst.traced(self.rank):  # LTXAV_PARALLEL_TRACE_DIR: a profiler trace of this run
                if job["mode"] == "ksampler":
                    samples = comfy.sample.sample(
                        self.patcher, job["noise"], job["steps"], job["cfg"], job["sampler_name"], job["scheduler"],
                        job["positive"], job["negative"], job["latent"], denoise=job["denoise"],
                        disable_noise=job["disable_noise"], start_step=job["start_step"], last_step=job["last_step"],
                        force_full_denoise=job["force_full_denoise"], noise_mask=job["noise_mask"],
                        callback=self._callback, disable_pbar=True, seed=job["seed"])
                else:
                    guider = job["guider"]
                    samples = guider.sample(job["noise"], job["latent"], job["sampler"], job["sigmas"],
                                            denoise_mask=job["noise_mask"], callback=self._callback,
                                            disable_pbar=True, seed=job["seed"])
                    samples = samples.to(comfy.model_management.intermediate_device())
        except comfy.model_management.InterruptProcessingException:
            return {"interrupted": True, "step": self.step, "memory": self.memory()}
        finally:
            x0 = None if self.last_x0 is None or self.rank else self.last_x0.cpu()
            self.last_x0 = None
            comfy.model_management.soft_empty_cache()  # give cached blocks back: steady memory across prompts
        out = {"interrupted": False, "memory": self.memory(), "step_times": self.step_times}
        if self.rank == 0:
            out["samples"] = samples
            out["x0"] = x0
        return out

    def memory(self) -> dict:
        """Peaks of this run's forwards, above what was allocated when each forward began (weights,
        latents, conditioning), in GB; None on CPU."""
        stats = self.sp.stats
        out = {"rank": self.rank}
        for name in ("peak", "pe", "blocks"):
            out[f"{name}_gb"] = _gb(stats[name]) if self.cuda and name in stats else None
        out["allocated_gb"] = _gb(torch.cuda.memory_allocated()) if self.cuda else None
        # weights on the GPU after the run (with DynamicVRAM the rest waits in host memory)
        out["weights_gb"] = _gb(self.patcher.loaded_size()) if self.cuda and self.patcher is not None else None
        out.update(host_memory())
        return out


def host_memory() -> dict:
    """This process's host memory in GiB: RSS (resident), PSS (resident, pages shared with other
    processes counted by share: a memory-mapped checkpoint read by two workers counts half in each) and
    USS (its own pages only)."""
    try:
        import psutil

        m = psutil.Process().memory_full_info()
    except Exception:  # noqa: BLE001 - no psutil, or no access: no host figures
        return {}
    return {f"host_{k}_gb": _gb(getattr(m, k)) for k in ("rss", "pss", "uss") if hasattr(m, k)}
