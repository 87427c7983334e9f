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
  callbacks, object patches), which travel with every job in the job's own pickle (``job_payload``), so
  an object the options and the job share (a guider's flag its block patches read) stays one object on
  the worker. Each option is also pickled alone, for the check that every worker can rebuild it
  (``check_parts``) before anything samples.

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
    and its value (a list of functions for wrappers and callbacks)."""

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
        elif head == "wrappers":
            for fn in self.value:
                patcher.add_wrapper_with_key(rest[0], rest[1], fn)
        elif head == "callbacks":
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
        options = [o for name, (o, _) in self.options.items() if name not in dropped]
        return dumps({"options": options, "job": job}, self.refs)

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
    skipped, options = [], {}
    for option in options_of(patcher, own_keys):
        try:
            options[option.name] = (option, dumps(option.value, refs))
        except Exception:  # noqa: BLE001 - anything unpicklable stays behind, named in the warning
            skipped.append(option.name)
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
