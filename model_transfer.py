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
tensors have no version counter) and for every kind of tensor a loader makes.

Keys are made from content (``content_keys.content_digest``), not identity.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import pickle
import types

from . import model_recipes, node_packs
from .content_keys import content_digest

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
