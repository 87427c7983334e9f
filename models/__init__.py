"""The model families the parallel nodes run: a registry from ComfyUI's diffusion-model class to the
module of the family's hooks. A family module provides ``NAME``, ``MODEL_CLASS`` (module, class),
``video_heads(dm)`` (heads of its sharded self-attention), ``plan_dims(dm, compute_dtype)`` (for
``memory_plan``), ``transformer_options_of`` / ``with_transformer_options`` (where its forward takes
them) and ``Hooks(model, fwd)``: ``patches()``, ``attention_roles()`` and ``phases()`` for one
sharded forward (see ``ltxav``). A new family is one module here plus its line in ``FAMILIES``."""
from __future__ import annotations

import importlib
import types

FAMILIES = ("ltxav",)  # modules of this package, in the order they are tried


def _family(name: str) -> types.ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def _model_class(family: types.ModuleType) -> type:
    module, cls = family.MODEL_CLASS
    return getattr(importlib.import_module(module), cls)


def family_of(diffusion_model, node: str) -> types.ModuleType:
    """The family module of ComfyUI's ``diffusion_model``; a message naming ``node`` when none is."""
    families = [_family(name) for name in FAMILIES]
    for family in families:
        if isinstance(diffusion_model, _model_class(family)):
            return family
    names = " or ".join(f.NAME for f in families)
    raise ValueError(f"{node}: the model is a {type(diffusion_model).__name__}, not {names}; the parallel "
                     f"sampler supports {names} checkpoints only (load one with 'Load Diffusion Model' or "
                     "'Load Checkpoint').")
