"""What a worker needs to rebuild ComfyUI's MODEL, and how anything that refers to it crosses to the
workers.

Anything pickled with ``dumps`` that refers to the driver's MODEL (its ModelPatcher, model_options,
BaseModel or diffusion model) is sent as a reference and resolves, in ``loads``, to the worker's own
copy, so guiders and model options travel without the weights. ``model_spec`` is the MODEL's load
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


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to rebuild a MODEL: ``recipe`` and ``spec`` (pickled), ``skipped`` (the names
    of the parts that cannot travel), ``file_key`` (what decides the weights read from disk),
    ``key`` (that plus everything applied on them) and ``part_keys`` (each applied part's own key,
    named as ``changed_parts`` reports it)."""

    recipe: bytes
    spec: bytes
    skipped: list
    file_key: str
    key: str
    part_keys: dict = dataclasses.field(default_factory=dict)  # part name -> its content key: what changed


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
    parts = {"patches": spec["patches"], "object patches": object_patches, "wrappers": wrappers,
             **{f"model_options[{k!r}]": v for k, v in options.items()},
             **{f"transformer_options[{k!r}]": v for k, v in to.items()}}
    part_keys = {name: content_digest(v, refs) for name, v in parts.items()}
    key = content_digest({"file": file_key, "parts": part_keys})
    return ModelSpec(recipe=cloudpickle.dumps(recipe), spec=dumps(spec, refs), skipped=skipped, file_key=file_key,
                     key=key, part_keys=part_keys)


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


def changed_parts(before: dict, after: dict) -> list[str]:
    """The names of the parts whose content keys differ between two ``ModelSpec.part_keys``."""
    return [name for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
