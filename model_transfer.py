"""What a worker needs to rebuild ComfyUI's MODEL, and how anything that refers to it crosses to the
workers.

Anything pickled with ``dumps`` that refers to the driver's MODEL (its ModelPatcher, model_options,
BaseModel, or any module, parameter or buffer of it by its path) is sent as a reference and resolves, in
``loads``, to the worker's own copy, so guiders, model options and block patches travel without the
weights. A pickle also carries where the custom node modules it refers to live (``node_packs``), so a
worker imports them under ComfyUI's names.

``model_spec`` splits the MODEL three ways:

* its load recipe (``model_recipes``: ComfyUI's ``cached_patcher_init``, or ComfyUI-GGUF's loader) and the
  file key made from it (and the file's size and time): a new file key reads the file again;
* its weight patches (LoRA) and the model key (file key + patches): a new model key re-applies patches on
  the loaded weights;
* its options (``Option``: model options, transformer options down to each block patch, wrappers,
  callbacks, object patches), which travel with every job in the job's own pickle (``job_payload``,
  ``dumps_job``; rebuilt by ``loads_job``), so an object the options and the job share (a guider's flag
  its block patches read) stays one object on the worker. Each option is also pickled alone, for the
  check that every worker can rebuild it (``check_parts``) before anything samples.

Weight patches are sent only to workers that lack the model key (``ModelSpec.spec`` is pickled on first
use). The patches' identity holds under ``torch.inference_mode()`` (ComfyUI runs every node there: its
tensors have no version counter) and for every kind of tensor a loader makes (``_tensor_bytes_digest``).

Keys are made from content (``content_digest``), not identity.
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

from . import model_recipes, node_packs

MODEL_REF_NAMES = ("patcher", "model_options", "base_model", "diffusion_model")
# parts of a ModelPatcher that do not travel (a warning names those in use): other models, ComfyUI's
# hooks and the patcher-level extensions few nodes use
NOT_SENT = ("additional_models", "attachments", "injections", "hook_patches", "weight_wrapper_patches")


def model_refs(patcher) -> dict:
    """The objects that stand for the model in anything sent to workers: the patcher, its options, the
    BaseModel and its diffusion model, and every module, parameter and buffer of the BaseModel by path."""
    base = patcher.model
    refs = {"patcher": patcher, "model_options": patcher.model_options, "base_model": base,
            "diffusion_model": base.diffusion_model}
    for kind, named in (("module", base.named_modules()), ("parameter", base.named_parameters()),
                        ("buffer", base.named_buffers())):
        for name, obj in named:
            if name:
                refs.setdefault(f"{kind}:{name}", obj)
    return refs


def dumps(obj, refs: dict) -> bytes:
    """cloudpickle ``obj``, sending the objects in ``refs`` by name; after it, the custom node modules it
    refers to (``node_packs.roots``) and that part's length."""
    from ray import cloudpickle

    by_id = {}
    for k, v in refs.items():
        by_id.setdefault(id(v), k)
    modules = set()

    class RefPickler(cloudpickle.Pickler):
        def persistent_id(self, o):
            return by_id.get(id(o))

        def reducer_override(self, o):
            if isinstance(o, types.ModuleType):
                modules.add(o.__name__)
            elif isinstance(o, (type, types.FunctionType, types.BuiltinFunctionType)):
                modules.add(getattr(o, "__module__", None) or "")
            return super().reducer_override(o)

    buf = io.BytesIO()
    RefPickler(buf, protocol=5).dump(obj)
    roots = pickle.dumps(node_packs.roots(modules))
    buf.write(roots)
    buf.write(len(roots).to_bytes(8, "little"))
    return buf.getvalue()


def loads(data: bytes, refs: dict):
    """Inverse of ``dumps``: names resolve to the objects in ``refs``, custom node modules import under
    ComfyUI's names (``node_packs.PathNamedModules``), their packs' ``__init__`` not run; where that fails
    (something defined there, or set up there for the pack's modules), once more after running them."""
    n = int.from_bytes(data[-8:], "little")
    roots = pickle.loads(data[-8 - n:-8])
    if roots:
        node_packs.finder().add(roots)

    class RefUnpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            return refs[pid]

    try:
        return RefUnpickler(io.BytesIO(data)).load()
    except (ImportError, AttributeError):
        if not [name for name in roots if node_packs.complete(name)]:
            raise
        return RefUnpickler(io.BytesIO(data)).load()


def modules_of(data: bytes) -> list[str]:
    """The node packs (folder names) whose modules a ``dumps`` pickle refers to."""
    n = int.from_bytes(data[-8:], "little")
    return sorted({node_packs.pack_name(m) for m in pickle.loads(data[-8 - n:-8])})


OPTION_KINDS = {"model_options": "model option", "transformer_options": "transformer option", "wrappers": "wrapper",
                "callbacks": "callback", "object_patches": "object patch"}


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a MODEL: where it goes (``path``: ``("model_options", key)``, ``("transformer_options",
    key, ...)``, ``("wrappers", kind, key)``, ``("callbacks", kind, key)`` or ``("object_patches", name)``)
    and its value (a list of functions for wrappers and callbacks). ``apply`` sets it on a patcher: one
    cloned from the loaded weights (a worker), or from the driver's MODEL itself (the dry run of
    ``guidance_passes``), whose own entry the rebuilt one replaces."""

    path: tuple
    value: object

    @property
    def name(self) -> str:
        head, *rest = self.path
        return f"{OPTION_KINDS[head]} {'/'.join(map(str, rest))}"

    def apply(self, patcher) -> None:
        head, *rest = self.path
        if head == "model_options":
            patcher.model_options[rest[0]] = self.value
        elif head == "transformer_options":
            d = patcher.model_options.setdefault("transformer_options", {})
            for k in rest[:-1]:
                d = d.setdefault(k, {})
            d[rest[-1]] = self.value
        elif head == "wrappers":  # in place of what a clone of the driver's MODEL holds under that key
            patcher.remove_wrappers_with_key(rest[0], rest[1])
            for fn in self.value:
                patcher.add_wrapper_with_key(rest[0], rest[1], fn)
        elif head == "callbacks":
            patcher.remove_callbacks_with_key(rest[0], rest[1])
            for fn in self.value:
                patcher.add_callback_with_key(rest[0], rest[1], fn)
        else:
            patcher.add_object_patch(rest[0], self.value)


# transformer options split one level further: the block patches of several nodes live side by side there
SPLIT_TRANSFORMER_OPTIONS = {"patches": 1, "patches_replace": 2}


def options_of(patcher, own_keys=()) -> list[Option]:
    """``patcher``'s options as they travel (the pack's own wrappers, keyed ``own_keys``, stay behind: the
    worker adds its own)."""
    out = [Option(("model_options", k), v) for k, v in patcher.model_options.items() if k != "transformer_options"]

    def split(path, value, depth):
        if depth and isinstance(value, dict):
            for k, v in value.items():
                split((*path, k), v, depth - 1)
        else:
            out.append(Option(path, value))

    for k, v in patcher.model_options.get("transformer_options", {}).items():
        if k != "wrappers":  # ComfyUI's sampler puts the patcher's wrappers there for a run
            split(("transformer_options", k), v, SPLIT_TRANSFORMER_OPTIONS.get(k, 0))
    for head, by_kind in (("wrappers", patcher.wrappers), ("callbacks", patcher.callbacks)):
        for kind, by_key in by_kind.items():
            out += [Option((head, kind, key), list(fns)) for key, fns in by_key.items() if fns and key not in own_keys]
    out += [Option(("object_patches", k), v) for k, v in patcher.object_patches.items()]
    return out


def travelling_options(patcher, refs: dict, own_keys=()) -> tuple[dict, list]:
    """``patcher``'s options that can be pickled, each with its own pickle (name -> (Option, pickle)), and
    the names of those that cannot (they stay behind, named in a warning)."""
    options, skipped = {}, []
    for option in options_of(patcher, own_keys):
        try:
            options[option.name] = (option, dumps(option.value, refs))
        except Exception:  # noqa: BLE001 - anything unpicklable stays behind, named in the warning
            skipped.append(option.name)
    return options, skipped


def _job_pickle(job, options, refs: dict) -> bytes:
    return dumps({"options": list(options), "job": job}, refs)


def dumps_job(job, patcher, own_keys=()) -> bytes:
    """A sampling job (``jobs.KSamplerJob`` / ``jobs.GuiderJob``) and ``patcher``'s options that can be
    pickled, in one pickle (``loads_job``): an object the job and an option share (MultimodalGuider's STG
    flag, which its block patches read) stays one object. For a MODEL with a load recipe,
    ``ModelSpec.job_payload`` makes the same from the options it pickled already."""
    refs = model_refs(patcher)
    options, _ = travelling_options(patcher, refs, own_keys)
    return _job_pickle(job, (o for o, _ in options.values()), refs)


def loads_job(data: bytes, patcher):
    """Inverse of ``dumps_job`` / ``ModelSpec.job_payload`` on ``patcher`` (a clone of the MODEL the job
    was made for, or of the worker's loaded weights): the options are set on it, the job returned."""
    parts = loads(data, model_refs(patcher))
    for option in parts["options"]:
        option.apply(patcher)
    return parts["job"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to rebuild a MODEL: ``recipe`` (pickled), its weight ``patches`` (pickled when
    first asked for, ``spec``: workers that hold ``key`` need none), its ``options`` with each one's pickle
    (those that cannot be pickled are left out and named in ``skipped``; ``not_sent``: the patcher's parts
    in use that do not travel), ``file_key`` (what decides the weights read from disk) and ``key`` (that
    plus the weight patches)."""

    recipe: bytes
    patches: dict = dataclasses.field(repr=False)
    refs: dict = dataclasses.field(repr=False)
    options: dict = dataclasses.field(repr=False)  # name -> (Option, its pickle)
    skipped: list
    not_sent: list
    file_key: str
    key: str

    @functools.cached_property
    def spec(self) -> bytes:
        return dumps(self.patches, self.refs)

    def job_payload(self, job, dropped=()) -> bytes:
        """The options (but ``dropped``) and ``job`` in one pickle: what they share stays one object."""
        return _job_pickle(job, (o for name, (o, _) in self.options.items() if name not in dropped), self.refs)

    def check_parts(self) -> dict:
        """Each option's own pickle, by name, for the workers' check."""
        return {name: data for name, (_, data) in self.options.items()}


def model_spec(patcher, own_keys=(), node: str = "LTXAV Parallel Sampler") -> ModelSpec:
    """What a worker needs to rebuild ``patcher``'s model (see the module docstring); ValueError (naming
    ``node``) for a MODEL with no load recipe."""
    recipe = model_recipes.recipe_of(patcher, node)
    if recipe is None:
        raise ValueError(f"{node}: the MODEL has no load recipe: the workers load it from its file, and only "
                         "ComfyUI's 'Load Diffusion Model' (UNETLoader) and 'Load Checkpoint', and ComfyUI-GGUF's "
                         "'Unet Loader (GGUF)' (and Advanced) say which file it is; load it with one of those, or "
                         "use gpus=1, which samples in ComfyUI's process.")
    refs = model_refs(patcher)
    options, skipped = travelling_options(patcher, refs, own_keys)
    not_sent = [name for name in NOT_SENT if getattr(patcher, name, None)]
    patches = {k: list(v) for k, v in patcher.patches.items()}
    file_key = content_digest({"recipe": recipe, "files": _file_stats(recipe[1])})
    key = content_digest({"file": file_key, "patches": patches}, refs)
    return ModelSpec(recipe=dumps(recipe, {}), patches=patches, refs=refs, options=options, skipped=skipped,
                     not_sent=not_sent, file_key=file_key, key=key)


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
