"""Keys made from content, not identity: ``content_digest`` hashes what an object holds (tensor bytes,
numbers, strings, the attributes of objects), so the same LoRA loaded twice gives the same key and a changed
strength another (``model_transfer``'s file and model keys). A tensor's bytes are hashed once while it stays
unchanged (``_tensor_bytes_digest``), under ``torch.inference_mode()`` too (ComfyUI runs every node there:
its tensors have no version counter), and for every kind of tensor a loader makes."""
from __future__ import annotations

import enum
import functools
import hashlib
import pickle
import types
import uuid
import weakref

import torch


def content_digest(obj, refs: dict | None = None) -> str:
    """A hash of what ``obj`` holds (tensor bytes, numbers, strings, the attributes of objects), not of
    where it lives: the same LoRA loaded twice gives the same digest, a changed strength another.
    The objects in ``refs`` count by name. What cannot be read this way (no attributes, no pickle)
    counts by identity, so at worst a worker re-applies patches it could have kept."""
    try:
        return _digest(obj, {id(v): k for k, v in (refs or {}).items()})
    except RecursionError:  # too deep to read: a key of its own (patches are re-applied, never wrongly kept)
        return uuid.uuid4().hex


def _digest(obj, names: dict) -> str:
    """``content_digest`` with the refs' names by object id (made once: a LoRA's every adapter holds a set,
    digested on its own, and a 48-layer model has thousands of refs)."""
    h = hashlib.blake2b(digest_size=16)
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
            return put(b"set", b"".join(sorted(bytes.fromhex(_digest(x, names)) for x in o)))
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

    walk(obj)
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
