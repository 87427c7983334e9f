"""Attention with less memory than ComfyUI's own call, and the same results: what lets one card, and
each of several, hold longer clips.

Three things, each where the memory goes in a long LTX forward:

* **rotary tables where they are used**: the model family defers the tables ComfyUI makes for every
  token once a forward and keeps through every block (``models.ltx_rope``); queries and keys are
  rotated a range of tokens at a time, in place;
* **the attention output in the query's buffer**: ``attention_into_query`` runs ComfyUI's attention
  (or the override another node set) on a range of queries at a time over all keys, and writes each
  range's output over the queries it came from (softmax attention treats each query on its own, so
  the result is the same), instead of a new output plus ComfyUI's reshaped copy of it;
* **the output projection in place**: a square ``to_out`` projection runs a range of tokens at a time
  into its own input (``ffn_chunking.chunked_forward``), instead of a second hidden state (a GGUF weight
  dequantized once a call, not once a range);
* **the value in its input's buffer**: self-attention's value projection is the last one made of the
  normed hidden state, which ComfyUI's block drops after the call, so it runs a range at a time into
  that state (gated attention's gate logits, which ComfyUI takes from the same input after the
  attention, are taken first): x, its norm, q, k and v are four hidden states at the attention, not five.

The family says which modules (``rotary_patches``, ``in_place_projections``, ``in_place_values``);
``patches`` makes the
instance attributes. The workers' sharded forward installs them with its own attention routing
(``xdit_context_parallel``); in ComfyUI's process (one GPU) ``diffusion_model_wrapper`` does, added for
a run by ``on(patcher)``. Off with
``LTXAV_PARALLEL_LEAN_ATTENTION=0``.
"""
from __future__ import annotations

import contextlib
import math

from . import envs, ffn_chunking, models
from .patching import instance_attrs, may_overwrite

WRAPPER_KEY = "ltxav_lean_attention"
# queries an attention call takes at a time: its output and ComfyUI's reshaped copy of it are two of
# these ranges (~0.25 GiB at 4096 wide), and a range still fills a GPU's attention kernel
QUERY_CHUNK_TOKENS = 16384  # memory_plan.LEAN_RANGE_TOKENS
# tokens the output projection takes at a time (its output range: ~0.06 GiB at 4096 wide)
PROJECTION_CHUNK_TOKENS = 8192


def enabled() -> bool:
    return envs.LEAN_ATTENTION.on()


def attention_into_query(call, q, k, v, heads, mask=None, **kwargs):
    """``call(q, k, v, heads, mask=mask, **kwargs)`` (ComfyUI's attention, [B, S, heads * D] in and out),
    for long queries a range at a time into ``q``'s own buffer when the caller drops ``q`` after the
    call (``may_overwrite``). With a mask or another layout it is the plain call."""
    n = q.shape[1] if q.dim() == 3 else 0
    plain = (n <= QUERY_CHUNK_TOKENS or mask is not None or kwargs.get("skip_reshape")
             or kwargs.get("skip_output_reshape") or not may_overwrite(q, whole_view=True)
             or len({t.untyped_storage().data_ptr() for t in (q, k, v)}) < 3)
    if plain:
        return call(q, k, v, heads, mask=mask, **kwargs)
    for start in range(0, n, QUERY_CHUNK_TOKENS):
        end = min(n, start + QUERY_CHUNK_TOKENS)
        q[:, start:end] = call(q[:, start:end], k, v, heads, mask=None, **kwargs)
    return q


def quantized_layers(module) -> list:
    """The ComfyUI-GGUF layers in ``module`` that hold quantized weights (their own ``is_ggml_quantized``
    and ``cast_bias_weight``), unless something already set an instance ``cast_bias_weight`` on them."""
    return [m for m in module.modules() if callable(getattr(m, "is_ggml_quantized", None))
            and callable(getattr(m, "cast_bias_weight", None)) and "cast_bias_weight" not in vars(m)
            and m.is_ggml_quantized()]


def _cast_once(cast):
    got = {}

    def once(input=None, dtype=None, device=None, bias_dtype=None):
        key = (getattr(input, "dtype", None), getattr(input, "device", None), dtype, device, bias_dtype)
        if key not in got:
            got[key] = cast(input, dtype=dtype, device=device, bias_dtype=bias_dtype)
        return got[key]
    return once


def dequantized_once(layers):
    """For the ``with`` body, each ComfyUI-GGUF layer of ``layers`` dequantizes its weight (and applies its
    LoRA patches: its own ``cast_bias_weight``) for the first range of tokens and hands the same weight
    to the others, as one call on the whole input does, instead of once a range. Instance attributes."""
    return instance_attrs([(m, "cast_bias_weight", _cast_once(m.cast_bias_weight)) for m in layers])


def projecting_in_place(module):
    """A forward for a projection ``module`` whose output is as wide as its input: long inputs a range
    of tokens at a time into the input's own buffer when it is the caller's temporary (a GGUF weight
    dequantized once for all ranges)."""
    forward = module.forward
    quantized = quantized_layers(module)

    def run(x):
        n = x.shape[1] if x.dim() == 3 else 0
        if n <= PROJECTION_CHUNK_TOKENS:
            return forward(x)
        with dequantized_once(quantized):
            return ffn_chunking.chunked_forward(module, x, math.ceil(n / PROJECTION_CHUNK_TOKENS),
                                                whole_view=True, plain=lambda _, t: forward(t))
    return run


def value_in_input(attn) -> list:
    """``(obj, name, value)`` for self-attention ``attn`` (a family's ``in_place_values``): its value
    projection writes into its input; a gate (``to_gate_logits``, LTX-2.3) is computed from that input
    before, and handed back when the attention asks for it with the same tensor."""
    project = projecting_in_place(attn.to_v)
    gate = getattr(attn, "to_gate_logits", None)
    if gate is None:
        return [(attn.to_v, "forward", project)]
    gate_forward = gate.forward
    taken = {}

    def value(x):
        taken["input"], taken["logits"] = x, gate_forward(x)
        return project(x)

    def gate_logits(x):
        if taken.get("input") is x:
            logits = taken["logits"]
            taken.clear()
            return logits
        return gate_forward(x)
    return [(attn.to_v, "forward", value), (gate, "forward", gate_logits)]


def patches(model, family, options: dict) -> list:
    """``(obj, name, value)`` instance attributes for one lean forward of ``model`` (of ``family``, with
    the forward's ``transformer_options``), made from the attributes the modules have now (so they wrap
    what an outer layer installed)."""
    values = [t for attn in family.in_place_values(model, options) for t in value_in_input(attn)]
    return values + family.rotary_patches(model) + [(m, "forward", projecting_in_place(m))
                                                    for m in family.in_place_projections(model)]


def values_in_place(model, family, options: dict) -> bool:
    """Whether a lean forward of ``model`` with these options writes its self-attention values in place
    (the planner's term)."""
    return enabled() and bool(family.in_place_values(model, options))


def diffusion_model_wrapper(executor, *args, **kwargs):
    """ComfyUI DIFFUSION_MODEL wrapper: one forward with the family's lean patches and the attention
    calls writing into their queries (for ComfyUI's process; the workers' sharded forward has its own)."""
    model = executor.class_obj
    try:
        family = models.family_of(model, "LTXAV lean attention")
    except ValueError:  # not a family the pack knows: ComfyUI's forward as it is
        return executor(*args, **kwargs)
    options = family.transformer_options_of(args, kwargs)
    outer = options.get("optimized_attention_override")

    def override(func, *a, **kw):
        call = func if outer is None else (lambda *b, **c: outer(func, *b, **c))
        return attention_into_query(call, *a, **kw)

    args, kwargs = family.with_transformer_options(args, kwargs, {**options, "optimized_attention_override": override})
    with instance_attrs(patches(model, family, options)):
        return executor(*args, **kwargs)


@contextlib.contextmanager
def on(patcher):
    """``patcher`` (a ComfyUI ModelPatcher) runs its forwards lean inside the ``with`` (nothing when
    ``LTXAV_PARALLEL_LEAN_ATTENTION=0``); its wrappers are as before afterwards."""
    from comfy.patcher_extension import WrappersMP

    if not enabled():
        yield
        return
    kind = WrappersMP.DIFFUSION_MODEL
    had = list(patcher.wrappers.get(kind, {}).get(WRAPPER_KEY, []))
    patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
    patcher.add_wrapper_with_key(kind, WRAPPER_KEY, diffusion_model_wrapper)
    try:
        yield
    finally:
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
        for fn in had:
            patcher.add_wrapper_with_key(kind, WRAPPER_KEY, fn)
