"""Sequence-chunked feed-forward for LTX transformer blocks (video ``ff`` and audio ``audio_ff``).

The FFN of an LTX-2 block expands every token 4x (two such tensors live at once: the projection
and its GELU). Running it over slices of the token sequence keeps that expansion to one slice at a
time; the output is the same because the FFN acts on each token independently.

How it is attached (no module is replaced, nothing global is patched):
  * settings live in ``transformer_options[CHUNKING_KEY]`` as plain data (so they survive
    ``ModelPatcher.clone`` and can be sent to other processes);
  * ``diffusion_model_wrapper`` is a ComfyUI DIFFUSION_MODEL wrapper: for the duration of one
    forward it sets ``forward`` on each block's ``ff`` / ``audio_ff`` *instance* and removes it
    afterwards, so weight patches (LoRA), dtype casting and offloading keep using the same modules;
  * ``auto`` sizes chunks from the memory left for activations as the model's ComfyUI patcher counts
    it (``ModelPatcher.get_free_memory``: with DynamicVRAM the weights it can page out count as free),
    read by ``apply_model_wrapper`` (APPLY_MODEL: it sees the model and its patcher) for the forward.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from . import memory_plan
from .models.ltxav import TRANSFORMER_OPTIONS_ARG
from .patching import instance_attrs, may_overwrite, transformer_options_at

log = logging.getLogger(__name__)

CHUNKING_KEY = "ltx_ffn_chunking"
WRAPPER_KEY = "ltx_ffn_chunking"
FREE_MEMORY_KEY = "ltx_ffn_chunking_free_bytes"  # transformer_options: the patcher's free memory for this forward
MAX_CHUNKS = memory_plan.FFN_MAX_CHUNKS


@dataclasses.dataclass(frozen=True)
class ChunkSettings:
    """What the user asked for: a fixed chunk count, or ``auto``."""

    num_chunks: int = 1
    auto: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_options(cls, transformer_options) -> ChunkSettings | None:
        raw = (transformer_options or {}).get(CHUNKING_KEY)
        return cls(**raw) if raw else None


def hidden_bytes_per_token(ff: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of FFN activation per token at its peak: the 4x projection and its GELU output."""
    proj = ff.net[0].proj
    return 2 * proj.out_features * torch.empty((), dtype=dtype).element_size()


def _chunk_bounds(n_tokens: int, n_chunks: int) -> list[int]:
    """Boundaries of ``n_chunks`` near-equal slices of ``n_tokens`` (sizes differ by at most one)."""
    return [(i * n_tokens) // n_chunks for i in range(n_chunks + 1)]


def chunked_forward(ff: torch.nn.Module, x: torch.Tensor, num_chunks: int, whole_view: bool = False,
                    plain=None) -> torch.Tensor:
    """``plain`` (default ``type(ff).forward``) applied to ``num_chunks`` slices of the sequence dim (1)
    of ``x``.

    Each output slice goes into ``x`` once its input slice has been consumed when that is safe
    (see ``may_overwrite``; ``whole_view``: a view spanning its storage counts), else into a new
    tensor. Equal to the unchunked call up to matmul reduction order.
    """
    plain = plain or type(ff).forward
    n_tokens = x.shape[1] if x.dim() >= 2 else 0
    n_chunks = min(num_chunks, n_tokens)
    if n_chunks <= 1:
        return plain(ff, x)
    bounds = _chunk_bounds(n_tokens, n_chunks)
    out = None
    for start, end in zip(bounds[:-1], bounds[1:]):
        y = plain(ff, x[:, start:end])
        if out is None:
            same = y.shape[2:] == x.shape[2:] and y.dtype == x.dtype and y.device == x.device
            out = x if same and may_overwrite(x, whole_view) else y.new_empty((x.shape[0], n_tokens, *y.shape[2:]))
        out[:, start:end] = y
        del y
    return out


def _free_memory(device: torch.device) -> float | None:
    """Free device memory as ComfyUI's model management reports it (for a forward run without a patcher)."""
    try:
        import comfy.model_management as mm
    except ImportError:  # outside ComfyUI (unit tests): no memory limit
        return None
    return mm.get_free_memory(device)


def chunks_for(settings: ChunkSettings, ff: torch.nn.Module, x: torch.Tensor, free_bytes: float | None) -> int:
    """Chunk count for one FFN call on ``x`` [B, tokens, dim] (decided per call: under sequence
    parallelism or with guide/reference tokens the FFN sees other lengths than the latent has)."""
    tokens = x.shape[1] if x.dim() >= 2 else 0
    if settings.auto:
        n = memory_plan.auto_ffn_chunks(tokens, hidden_bytes_per_token(ff, x.dtype), free_bytes)
    else:
        n = max(1, min(MAX_CHUNKS, settings.num_chunks))
    return max(1, min(n, tokens))


_logged: dict[str, tuple[int, int]] = {}


def new_run() -> None:
    """Forget what was logged so the next forward logs its chunking again (once per sampling run)."""
    _logged.clear()


def _log_chunks(kind: str, n: int, tokens: int) -> None:
    if _logged.get(kind) != (n, tokens):
        _logged[kind] = (n, tokens)
        log.info("%s FFN chunking active: %d chunks (%d tokens)", kind, n, tokens)


def _chunked_call(ff, kind, settings, free_bytes, x):
    n = chunks_for(settings, ff, x, free_bytes)
    if n <= 1:
        return type(ff).forward(ff, x)
    _log_chunks(kind, n, x.shape[1])
    return chunked_forward(ff, x, n)


def installed(diffusion_model: torch.nn.Module, settings: ChunkSettings, free_bytes: float | None = None):
    """Route every block's ``ff`` (video) / ``audio_ff`` through chunks inside the ``with``; the
    modules and their weights stay as they are."""
    triples = []
    for block in diffusion_model.transformer_blocks:
        for name, kind in (("ff", "Video"), ("audio_ff", "Audio")):
            ff = getattr(block, name, None)
            if ff is not None:
                triples.append((ff, "forward", functools.partial(_chunked_call, ff, kind, settings, free_bytes)))
    return instance_attrs(triples)


def diffusion_model_wrapper(executor, *args, **kwargs):
    """ComfyUI DIFFUSION_MODEL wrapper: chunk the FFNs for this forward if the options ask for it."""
    settings = ChunkSettings.from_options(transformer_options_at(TRANSFORMER_OPTIONS_ARG, args, kwargs))
    if settings is None:
        return executor(*args, **kwargs)
    model = executor.class_obj
    x = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
    free = None
    if settings.auto:
        free = transformer_options_at(TRANSFORMER_OPTIONS_ARG, args, kwargs).get(FREE_MEMORY_KEY)
        free = _free_memory(x.device) if free is None else free
    with installed(model, settings, free):
        return executor(*args, **kwargs)


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                        **kwargs):
    """ComfyUI APPLY_MODEL wrapper: with ``auto``, this forward's free memory from the model's patcher
    (DynamicVRAM's pageable weights included), handed to ``diffusion_model_wrapper``."""
    options = transformer_options if transformer_options is not None else {}
    settings = ChunkSettings.from_options(options)
    patcher = getattr(executor.class_obj, "current_patcher", None)
    if settings is not None and settings.auto and patcher is not None:
        options = {**options, FREE_MEMORY_KEY: patcher.get_free_memory(x.device)}
    return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def set_wrappers(patcher, on: bool) -> None:
    """Remove, and with ``on`` add again, this module's wrappers on a ComfyUI ModelPatcher (the
    chunk settings themselves live in its transformer_options)."""
    from comfy.patcher_extension import WrappersMP

    wrappers = ((WrappersMP.DIFFUSION_MODEL, diffusion_model_wrapper), (WrappersMP.APPLY_MODEL, apply_model_wrapper),
                (WrappersMP.OUTER_SAMPLE, outer_sample_wrapper))
    for kind, fn in wrappers:
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
        if on:
            patcher.add_wrapper_with_key(kind, WRAPPER_KEY, fn)


def outer_sample_wrapper(executor, *args, **kwargs):
    """ComfyUI OUTER_SAMPLE wrapper: marks the start of a sampling run (for the once-per-run log)."""
    new_run()
    return executor(*args, **kwargs)


def apply_ffn_chunking(model, settings: ChunkSettings):
    """A clone of ``model`` whose LTX block FFNs run in chunks (the LTX FFN Chunker node's output); ``model``
    itself is untouched."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    on = settings.auto or settings.num_chunks > 1  # 1 chunk = off: plain ComfyUI behaviour
    if on:
        to[CHUNKING_KEY] = settings.as_dict()
    else:
        to.pop(CHUNKING_KEY, None)
    set_wrappers(m, on)
    return m
