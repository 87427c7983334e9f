"""What a worker needs to rebuild ComfyUI's MODEL, and how anything that refers to it crosses to the
workers.

Anything pickled with ``dumps`` that refers to the driver's MODEL (its ModelPatcher, model_options,
BaseModel, diffusion model or any module in it) is sent as a reference and resolves, in ``loads``, to the
worker's own copy, so guiders and model options travel without the weights; a job (``dumps_job``) also
refers to what the MODEL's options hold by its path there, so what a guider shares with a patch stays
shared on the worker. ``model_spec`` is the MODEL's load
recipe (``cached_patcher_init``, set by ComfyUI's loaders) plus its weight patches (LoRA), object
patches and options. Two keys, made from content (``content_digest``), decide what a worker redoes:
the file key (the recipe: file, dtype, loader options; and the file's size and time) rebuilds the
model from disk; the model key (file key + patches, object patches, options) only makes a new clone
of the loaded model with the new patches.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import io
import os
import pickle
import types
import uuid
import weakref

import torch

MODEL_REF_NAMES = ("patcher", "model_options", "base_model", "diffusion_model")


def model_refs(patcher) -> dict:
    """The objects that stand for the model in anything sent to workers."""
    return {"patcher": patcher, "model_options": patcher.model_options, "base_model": patcher.model,
            "diffusion_model": patcher.model.diffusion_model}


def dumps(obj, refs: dict, options: bool = False) -> bytes:
    """cloudpickle ``obj``, sending the objects in ``refs`` by name and the model's submodules by their
    names in it; with ``options`` also every object inside the MODEL's options by its path there
    (``shared_ids``)."""
    from ray import cloudpickle

    by_id = shared_ids(refs, options)

    class RefPickler(cloudpickle.Pickler):
        def persistent_id(self, o):
            return by_id.get(id(o))

    buf = io.BytesIO()
    RefPickler(buf, protocol=5).dump(obj)
    return buf.getvalue()


def dumps_job(job, patcher) -> bytes:
    """A sampling job (``jobs.KSamplerJob`` / ``jobs.GuiderJob``) for workers holding ``patcher``'s model:
    the model, its submodules and what its options hold, by reference."""
    return dumps(job, model_refs(patcher), options=True)


def loads(data: bytes, refs: dict):
    """Inverse of ``dumps``: names, submodule names and option paths resolve in ``refs``."""

    class RefUnpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            return resolve(pid, refs)

    return RefUnpickler(io.BytesIO(data)).load()


def shared_ids(refs: dict, options: bool = False) -> dict:
    """id -> persistent id of what stands for the model: the objects in ``refs`` (their names); every
    submodule of its BaseModel (``("module", name)``: a node pack's patch that holds a transformer block,
    such as ComfyUI-LTXVideo's STGBlockWrapper, refers to the worker's own block instead of carrying a
    copy of its weights); with ``options``, every object inside the MODEL's options but its wrappers
    (``("option", path)``), for a job unpickled after them: an object a guider shares with a patch in the
    options (MultimodalGuider's STG flag, which its patches read) is then the worker's one too."""
    by_id = {id(v): k for k, v in refs.items()}
    base = refs.get("base_model")
    if isinstance(base, torch.nn.Module):
        for name, module in base.named_modules():
            by_id.setdefault(id(module), ("module", name))

    def walk(o, path, depth):
        if (depth > 16 or isinstance(o, (str, bytes, int, float, complex, bool, type(None), torch.Tensor,
                                         torch.nn.Module, type, types.FunctionType, types.MethodType,
                                         types.BuiltinFunctionType, functools.partial, enum.Enum))):
            return
        if path and not isinstance(o, (tuple, frozenset)):
            if id(o) in by_id:
                return
            by_id[id(o)] = ("option", path)
        if isinstance(o, dict):
            for k, v in o.items():
                if not (depth == 1 and k == "wrappers"):  # the workers make their own wrappers lists
                    walk(v, (*path, ("item", k)), depth + 1)
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, (*path, ("item", i)), depth + 1)
        elif hasattr(o, "__dict__"):
            for k, v in vars(o).items():
                walk(v, (*path, ("attr", k)), depth + 1)

    if options and "model_options" in refs:
        walk(refs["model_options"], (), 0)
    return by_id


def resolve(pid, refs: dict):
    """The object a persistent id of ``shared_ids`` names, in ``refs``."""
    if isinstance(pid, str):
        return refs[pid]
    kind, where = pid
    if kind == "module":
        return refs["base_model"].get_submodule(where)
    o = refs["model_options"]
    try:
        for how, key in where:
            o = o[key] if how == "item" else getattr(o, key)
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        steps = "".join(f"[{k!r}]" if how == "item" else f".{k}" for how, k in where)
        raise RuntimeError(f"the job refers to model_options{steps}, which this worker's MODEL lacks (a part of "
                           "the MODEL that could not be sent?)") from e
    return o


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to rebuild a MODEL: ``recipe`` and ``spec`` (pickled), ``skipped`` (the names
    of the parts that cannot travel), ``file_key`` (what decides the weights read from disk) and
    ``key`` (that plus everything applied on them). ``spec`` is pickled when first asked for: workers
    that hold ``key`` already need no copy of the patches (a LoRA's tensors)."""

    recipe: bytes
    parts: dict = dataclasses.field(repr=False)
    refs: dict = dataclasses.field(repr=False)
    skipped: list
    file_key: str
    key: str

    @functools.cached_property
    def spec(self) -> bytes:
        return dumps(self.parts, self.refs)


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
    return ModelSpec(recipe=cloudpickle.dumps(recipe), parts=spec, refs=refs, skipped=skipped, file_key=file_key,
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
    The objects in ``refs`` and the model's submodules count by name. What cannot be read this way (no
    attributes, no pickle) counts by identity, so at worst a worker re-applies patches it could have kept."""
    h = hashlib.blake2b(digest_size=16)
    names = {i: repr(pid) for i, pid in shared_ids(refs or {}).items()}  # submodules by name, not their weights
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
        put(b"tensor", f"{type(t).__module__}.{type(t).__qualname__}:{t.dtype}:{tuple(t.shape)}".encode())
        try:
            data = _tensor_bytes_digest(t)  # None: no bytes of its own (a wrapper subclass, a meta tensor)
        except Exception:  # noqa: BLE001 - a kind of tensor not foreseen: read by its fields or identity
            data = None
        if data is not None:
            put(b"data", data)
        state = _tensor_state(t)  # a subclass's own fields: quantization type, scales, inner tensors
        if state:
            walk(state)
        elif data is None:  # nothing to read: identity (a change forces re-applying, never a wrong reuse)
            put(b"id", f"{id(t)}:{uuid.uuid4()}".encode())

    try:
        walk(obj)
    except RecursionError:  # too deep to read: a key of its own (patches are re-applied, never wrongly kept)
        return uuid.uuid4().hex
    return h.hexdigest()


# tensor id -> (weak reference, state, digest of its bytes): a LoRA's tensors stay the same objects from
# prompt to prompt (ComfyUI caches the loader's output), so their bytes are hashed once, and again only
# when ``_cache_state`` changes; a dead tensor's entry goes with it
_TENSOR_DIGESTS: dict[int, tuple] = {}
SAMPLED_ELEMENTS = 64  # elements of an inference tensor compared on each use (it has no version counter)


def _plain(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s own bytes as a plain tensor (a quantized tensor's integers; a subclass with storage, such as
    ComfyUI-GGUF's GGMLTensor, as its raw data); None when it holds none (a wrapper subclass such as
    comfy-kitchen's QuantizedTensor keeps its data in inner tensors; a meta tensor has none)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t) or t.is_meta or t.layout != torch.strided:
        return None
    if t.is_quantized:
        return t.int_repr()
    return t if type(t) is torch.Tensor else torch.Tensor.as_subclass(t, torch.Tensor)


def _cache_state(t: torch.Tensor, plain: torch.Tensor) -> tuple:
    """What must stay the same for a cached digest to hold. A tensor made outside inference mode has a
    version counter that every in-place change bumps. One made inside (ComfyUI runs every node under
    torch.inference_mode(): a LoRA's tensors are such) has none: there a sample of its elements stands in,
    which every whole-tensor in-place change (scale, fill, copy_) alters. ComfyUI's nodes never change
    their inputs in place, so a LoRA's tensors are read once."""
    layout = (t.data_ptr(), tuple(plain.shape), plain.stride(), plain.dtype)
    if not t.is_inference():
        return (t._version, *layout)
    n = plain.numel()
    idx = torch.linspace(0, n - 1, min(n, SAMPLED_ELEMENTS)).round().long()
    with torch.no_grad():
        sample = plain[torch.unravel_index(idx, plain.shape)] if plain.dim() else plain.reshape(1)
    return ("sampled", bytes(sample.cpu().contiguous().view(torch.uint8).numpy()), *layout)


def _tensor_bytes_digest(t: torch.Tensor) -> bytes | None:
    """A digest of ``t``'s bytes (``_plain``), cached while ``_cache_state`` holds; None when it holds none.
    Any view, stride, device and tensor made inside or outside inference mode."""
    plain = _plain(t)
    if plain is None:
        return None
    state = _cache_state(t, plain)
    hit = _TENSOR_DIGESTS.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == state:
        return hit[2]
    with torch.no_grad():
        data = plain.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
        digest = hashlib.blake2b(memoryview(data.numpy()), digest_size=16).digest()
    key = id(t)
    _TENSOR_DIGESTS[key] = (weakref.ref(t, lambda _, key=key: _TENSOR_DIGESTS.pop(key, None)), state, digest)
    return digest


def _tensor_state(t: torch.Tensor) -> dict | None:
    """A tensor's fields beyond its bytes: a quantized tensor's scheme and scales; a subclass's own
    attributes (GGMLTensor: its quantization type and logical shape) or, for a wrapper subclass, its
    inner tensors and metadata (``__tensor_flatten__``)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    state = {}
    if t.is_quantized:
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            state["quant"] = (str(t.qscheme()), t.q_scale(), t.q_zero_point())
        else:
            state["quant"] = (str(t.qscheme()), t.q_per_channel_scales(), t.q_per_channel_zero_points(),
                              t.q_per_channel_axis())
    if is_traceable_wrapper_subclass(t):
        names, ctx = t.__tensor_flatten__()
        state["inner"] = {name: getattr(t, name) for name in names}
        state["ctx"] = ctx
    elif type(t) is not torch.Tensor:
        state.update(vars(t))
    return state or None


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
