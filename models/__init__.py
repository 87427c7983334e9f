"""The model families the parallel nodes run, registered by ComfyUI's diffusion-model class (as xDiT
registers its transformer wrappers): ``@register(model_class)`` on a ``Family`` subclass puts one
instance of it in ``REGISTRY``, and ``family_of(diffusion_model, node)`` finds it by ``isinstance``.

A family is what the pack needs to know of a model and nothing else does: ``Family`` lists it. A new
family is one module here (its ``Family`` subclass, decorated) plus its import line at the end of this module."""
from __future__ import annotations

import importlib
import logging

from .. import memory_plan
from ..patching import transformer_options_at, with_transformer_options_at

log = logging.getLogger(__name__)

# diffusion-model class (or its dotted name, imported when a model is looked up: the pack imports before
# ComfyUI has set itself up in a Ray worker) -> its family
REGISTRY: dict = {}


class Family:
    """The contract of a model family (one instance each, made by ``register``).

    * ``NAME``: how messages name it; ``HEADS``: the video attention heads of its released checkpoints
      (the nodes' tooltips; the checks use ``video_heads`` of the model at hand);
    * ``planner`` (``memory_plan.Coefficients``) and ``geometry`` (``memory_plan.LatentGeometry``): its
      numbers for the memory planner, which is model-free arithmetic;
    * ``plan_dims(dm, compute_dtype)``: the ``memory_plan.ModelDims`` of a model; ``video_heads(dm)``:
      the heads of its sharded self-attention (the Ulysses degree must divide them);
    * ``latent_clip(latent)``: the planner's ``Clip`` (token layout) and batch size of a sampler latent;
    * ``TRANSFORMER_OPTIONS_ARG``: where its forward (ComfyUI's DIFFUSION_MODEL call) takes
      ``transformer_options`` positionally (``transformer_options_of`` / ``with_transformer_options``);
    * ``Hooks(model, fwd)``: its part of one sharded forward (``xdit_context_parallel.ShardedForward``):
      ``patches()``, ``attention_roles()`` and ``phases()``, whose names are in ``PHASES``;
    * ``rotary_patches(model)`` / ``in_place_projections(model)``: the lean attention's parts
      (``lean_attention``; none by default).
    """

    NAME: str = ""
    HEADS: int = 0
    planner: memory_plan.Coefficients
    geometry: memory_plan.LatentGeometry
    TRANSFORMER_OPTIONS_ARG: int
    PHASES: tuple = ()  # names of the phases ``Hooks.phases`` reports (instrumentation's peaks and log lines)
    Hooks: type

    def video_heads(self, diffusion_model) -> int:
        raise NotImplementedError

    def plan_dims(self, diffusion_model, compute_dtype=None) -> memory_plan.ModelDims:
        raise NotImplementedError

    def latent_clip(self, latent) -> tuple[memory_plan.Clip, int]:
        return self.geometry.latent_clip(latent)

    def transformer_options_of(self, args, kwargs) -> dict:
        return transformer_options_at(self.TRANSFORMER_OPTIONS_ARG, args, kwargs)

    def with_transformer_options(self, args, kwargs, options: dict):
        return with_transformer_options_at(self.TRANSFORMER_OPTIONS_ARG, args, kwargs, options)

    def rotary_patches(self, model) -> list:
        return []

    def in_place_projections(self, model) -> list:
        return []

    def in_place_values(self, model, options: dict) -> list:
        """Self-attention modules whose value projection may write into their input (the caller drops it)."""
        return []


def register(model_class):
    """Class decorator: the decorated ``Family`` subclass is the family of ``model_class`` (a class, or
    its dotted name)."""
    def put(family_class: type) -> type:
        REGISTRY[model_class] = family_class()
        return family_class
    return put


def _resolve(key):
    """A registry key's class (None where its module does not import here)."""
    if isinstance(key, type):
        return key
    module, _, name = key.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        log.debug("model class %s not available: %s", key, e)
        return None


def family_of(diffusion_model, node: str) -> Family:
    """The family of ComfyUI's ``diffusion_model``; a message naming ``node`` when none is."""
    for key, family in REGISTRY.items():
        cls = _resolve(key)
        if cls is not None and isinstance(diffusion_model, cls):
            return family
    names = " or ".join(f.NAME for f in REGISTRY.values())
    raise ValueError(f"{node}: the model is a {type(diffusion_model).__name__}, not {names}; the parallel "
                     f"sampler supports {names} checkpoints only (load one with 'Load Diffusion Model' or "
                     "'Load Checkpoint').")


def heads_note() -> str:
    """The registered families' heads, as the nodes' tooltips say them ("32 for LTX-2 audio-video (LTXAV)")."""
    return ", ".join(f"{f.HEADS} for {f.NAME}" for f in REGISTRY.values() if f.HEADS)


# the registry: one line a family, importing its module so that its ``register`` runs
from . import ltxav  # noqa: E402,F401 - LTX-2 / LTX-2.3 audio-video
