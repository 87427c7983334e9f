"""LTX-2 / LTX-2.3 audio-video (ComfyUI's ``LTXAVModel``) under sequence parallelism: the video tokens
are sharded, audio tokens (about 25 a second) stay whole on every rank. ComfyUI's own
``LTXAVModel._forward`` runs; for one forward these hooks set instance attributes so that:

* ``_process_input`` patchifies as usual but projects (``patchify_proj``) only this rank's tokens;
  positions are sliced the same way, so ComfyUI's PE code only ever sees the local slice; without
  guides the positions are made on the host once a run (``RunConstants``), as are the
  double-precision RoPE grids, so the host does not wait for the GPU inside a step;
* ``_prepare_timestep`` sends ComfyUI's adaLN code the distinct timestep values (2 for
  image-to-video) instead of one per token, and blocks index them per local token
  (``LocalTimestep``): no rank holds a full-sequence timestep tensor;
* video self-attention is ``Role.SHARDED_SELF``; audio-to-video cross-attention is local (video
  queries, all audio keys); video-to-audio cross-attention is ``Role.SHARDED_KEYS`` (audio queries
  over each rank's video keys, merged exactly);
* guide attenuation masks (LTXVAddGuide with strength < 1): ComfyUI builds its N x N bias as on one
  GPU from a stand-in of the whole length, and this rank keeps its query rows;
* ``proj_out`` gathers the 128-channel output of every rank, so ComfyUI's keyframe scatter and
  unpatchify run on the whole latent, which is small.
"""
from __future__ import annotations

import functools

import torch

from .. import memory_plan
from ..patching import instance_attrs
from ..sequence_parallel import Role
from . import Family, ltx_rope, ltxav_plan, register

# ComfyUI's LTXAVModel._forward(x, timestep, context, attention_mask, frame_rate, transformer_options, ...)
TRANSFORMER_OPTIONS_ARG = 5


def rotary_patches(model) -> list:
    """``(obj, name, value)`` for one forward with the rotary tables deferred (``ltx_rope``): made where
    attention uses them, a range of tokens at a time, never for the whole sequence."""
    triples = [(model, "_prepare_positional_embeddings", ltx_rope.deferred(model._prepare_positional_embeddings))]
    for block in model.transformer_blocks:
        for attn in (block.attn1, block.audio_attn1, block.audio_to_video_attn, block.video_to_audio_attn):
            triples.append((attn, "forward", ltx_rope.attention_forward(attn)))
    return triples


def in_place_projections(model) -> list:
    """The output projections over the video tokens whose output is as wide as their input: video
    self-attention's and the text cross-attention's."""
    return [attn.to_out for block in model.transformer_blocks for attn in (block.attn1, block.attn2)]


def in_place_values(model, options: dict) -> list:
    """The self-attentions whose value projection may write into its input: ComfyUI's own ``CrossAttention``
    in ComfyUI's own audio-video block, whose forward makes the normed input, passes it to the attention
    and drops it (``del norm_vx``; the value is the last projection made of it). None when a patch
    replaces blocks (``patches_replace["dit"]``) or another node pack changed a block's or an attention's
    class or forward: their code may read that input again."""
    from comfy.ldm.lightricks.av_model import BasicAVTransformerBlock
    from comfy.ldm.lightricks.model import CrossAttention

    if (options.get("patches_replace") or {}).get("dit"):
        return []
    out = []
    for block in model.transformer_blocks:
        if type(block) is not BasicAVTransformerBlock or "forward" in vars(block):
            continue
        out += [a for a in (block.attn1, block.audio_attn1) if type(a) is CrossAttention and "forward" not in vars(a)]
    return out


def plan_dims(diffusion_model, compute_dtype=None) -> memory_plan.ModelDims:
    """What the memory planner needs of an ``LTXAVModel``; ``compute_dtype``: the dtype it runs in
    (ComfyUI's ``get_dtype_inference()``), default its weights' dtype."""
    blocks = list(diffusion_model.transformer_blocks)
    gated = any(getattr(getattr(b, "attn1", None), "to_gate_logits", None) is not None for b in blocks)
    return memory_plan.ModelDims(video_dim=diffusion_model.inner_dim,
                                 audio_dim=getattr(diffusion_model, "audio_inner_dim", 0) or 0,
                                 planner=ltxav_plan.COEFFICIENTS, gated_attention=gated,
                                 **memory_plan.weight_figures(diffusion_model, blocks, compute_dtype))


# --------------------------------------------------------------------------- timesteps

class _LocalTimestepMixin:
    """Per-token timestep embeddings for this rank's tokens, stored as ``data`` [B, K, F] for the K
    distinct timestep values and ``index`` [B, L] (value of each local token). Blocks expand one
    adaLN parameter at a time, as with ComfyUI's ``CompressedTimestep``."""

    def _setup(self, data: torch.Tensor, index: torch.Tensor):
        self.batch_size, self.num_frames, self.feature_dim = data.shape
        self.patches_per_frame = 0
        self.data = data
        self.index = index

    def _take(self, values: torch.Tensor) -> torch.Tensor:
        idx = self.index.unsqueeze(-1).expand(-1, -1, values.shape[-1])
        return values.gather(1, idx)

    def expand(self):
        return self._take(self.data)

    def expand_for_computation(self, scale_shift_table, batch_size, indices=slice(None, None)):
        n = scale_shift_table.shape[0]
        per_value = self.data.reshape(batch_size, self.num_frames, n, -1)[:, :, indices, :]
        table = scale_shift_table[indices].unsqueeze(0).unsqueeze(0).to(device=self.data.device, dtype=self.data.dtype)
        summed = table + per_value
        return tuple(self._take(summed[:, :, j]) for j in range(summed.shape[2]))


@functools.cache
def local_timestep_class():
    """``LocalTimestep``: a subclass of ComfyUI's CompressedTimestep (blocks test for that class)."""
    from comfy.ldm.lightricks.av_model import CompressedTimestep

    return type("LocalTimestep", (_LocalTimestepMixin, CompressedTimestep), {})


def make_local_timestep(data, index):
    obj = local_timestep_class().__new__(local_timestep_class())
    obj._setup(data, index)
    return obj


def distinct_values(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``t`` [B, N]: its distinct values [B, K] (rows padded by repeating a value) and the
    index [B, N] of each entry among them."""
    rows = [torch.unique(r, return_inverse=True) for r in t]
    k = max(v.numel() for v, _ in rows)
    values = torch.stack([torch.cat([v, v[-1:].expand(k - v.numel())]) for v, _ in rows])
    return values, torch.stack([i for _, i in rows])


def has_spatial_variation(denoise_mask: torch.Tensor) -> bool:
    """ComfyUI's LTXAV test "does any latent frame of the first sample's mask vary across the
    frame", in one device-to-host read instead of one per frame."""
    frames = denoise_mask[0, 0].flatten(1)
    return frames.numel() > 0 and bool((frames.amax(1) != frames.amin(1)).any())


# --------------------------------------------------------------------------- the hooks

class Hooks:
    """LTXAV's part of one sharded forward (``xdit_context_parallel.ShardedForward``: ``fwd``)."""

    def __init__(self, model, fwd):
        self.model = model
        self.fwd = fwd
        self.model_rope_grid = model.freq_grid_generator

    def patches(self) -> list:
        """``(obj, name, value)`` instance attributes for the forward."""
        m = self.model
        return [(m, "_process_input", self.process_input), (m, "_prepare_timestep", self.prepare_timestep),
                (m, "_build_guide_self_attention_mask", self.build_guide_mask),
                (m.proj_out, "forward", self.proj_out_gathered), (m, "freq_grid_generator", self.rope_grid)]

    def attention_roles(self) -> list:
        """``(attention module, Role)`` for the attention calls that see the sharded sequence."""
        out = []
        for block in self.model.transformer_blocks:
            out += [(block.attn1, Role.SHARDED_SELF), (block.video_to_audio_attn, Role.SHARDED_KEYS)]
        return out

    def phases(self) -> list:
        """``(obj, method name, phase)`` whose peaks and log lines instrumentation reports."""
        m = self.model
        return [(m, "_prepare_positional_embeddings", "pe"), (m, "_process_transformer_blocks", "blocks")]

    def process_input(self, x, keyframe_idxs, denoise_mask, **kwargs):
        """ComfyUI's input processing, with this rank's video tokens projected and positioned."""
        m = self.model
        pairs = [(m.patchify_proj, "forward", lambda t: t)]  # project only local tokens
        # Without guides, positions depend only on the latent's shape: ComfyUI computes them on the host
        # (its patchifier and scale factors would each copy a host tensor to the GPU), and the device copy
        # is kept for the run. With guides ComfyUI indexes positions with device masks: left as is.
        on_host = keyframe_idxs is None
        mask = denoise_mask
        if on_host:
            pairs.append((m.patchifier, "get_latent_coords", self.latent_positions_on_host))
            mask = None  # ComfyUI's test of it reads the mask back once per latent frame: done below, once
        with instance_attrs(pairs):
            (vx, ax), (v_coords, a_coords), extra = type(m)._process_input(m, x, keyframe_idxs, mask, **kwargs)
        if on_host and denoise_mask is not None:
            extra["has_spatial_mask"] = has_spatial_variation(denoise_mask)
        layout = self.fwd.shard(vx.shape[1])
        vx = m.patchify_proj(layout.take(vx))
        v_coords = layout.take(v_coords, dim=2)
        if on_host:
            v_coords = self.fwd.constants.on(vx.device, ("video positions", tuple(v_coords.shape)), v_coords)
        return [vx, ax], [v_coords, a_coords], extra

    def latent_positions_on_host(self, f, h, w, b, device):
        """ComfyUI's patchifier positions, made on the host once a run (``device`` is not used)."""
        p = self.model.patchifier
        return self.fwd.constants.host(("latent positions", f, h, w, b),
                                      lambda: type(p).get_latent_coords(p, f, h, w, b, "cpu"))

    def rope_grid(self, theta, n_dims, dim, device):
        """The model's RoPE frequency grid; the double-precision one is made on the host: kept on the device."""
        grid = self.model_rope_grid(theta, n_dims, dim, device)
        return self.fwd.constants.on(torch.device(device), ("rope grid", theta, n_dims, dim), grid)

    def prepare_timestep(self, timestep, batch_size, hidden_dtype, **kwargs):
        """ComfyUI's timestep embeddings for the distinct values, indexed per local token."""
        m = self.model
        prepare = functools.partial(type(m)._prepare_timestep, m)
        if timestep.dim() < 2 or timestep.shape[1] == 1:  # one value per sample: nothing grows with length
            return prepare(timestep, batch_size, hidden_dtype, **kwargs)
        grid_mask = kwargs.pop("grid_mask", None)
        if grid_mask is not None:
            timestep = timestep[:, grid_mask]
        values, index = distinct_values(timestep.reshape(timestep.shape[0], timestep.shape[1]))
        index = self.fwd.layout.take(index)
        kwargs["has_spatial_mask"] = True  # values are not laid out per frame: no per-frame compression
        (v_t, a_t, cross, v_p, a_p), (v_emb, a_emb), rest = prepare(values, batch_size, hidden_dtype, **kwargs)
        local = make_local_timestep
        v_t = local(v_t.data, index)
        v_emb = local(v_emb.data, index)
        if cross:
            cross = [cross[0], local(cross[1].data, index), local(cross[2].data, index), cross[3]]
        return [v_t, a_t, cross, v_p, a_p], [v_emb, a_emb], rest

    def build_guide_mask(self, x, transformer_options, merged_args):
        """ComfyUI's guide attenuation mask for the whole length; this rank's query rows of it."""
        vx = x[0]
        stand_in = vx.new_empty((vx.shape[0], self.fwd.layout.total, 0))
        mask = type(self.model)._build_guide_self_attention_mask(self.model, [stand_in], transformer_options,
                                                                 merged_args)
        return None if mask is None else self.fwd.layout.take(mask, dim=2)

    def proj_out_gathered(self, x):
        """The output projection of every rank's tokens, gathered in order without padding."""
        y = type(self.model.proj_out).forward(self.model.proj_out, x)
        return self.fwd.gather(y)


@register("comfy.ldm.lightricks.av_model.LTXAVModel")
class LTXAV(Family):
    """LTX-2 / LTX-2.3 audio-video (see the module docstring)."""

    NAME = "LTX-2 audio-video (LTXAV)"
    HEADS = 32
    planner = ltxav_plan.COEFFICIENTS
    geometry = ltxav_plan.GEOMETRY
    TRANSFORMER_OPTIONS_ARG = TRANSFORMER_OPTIONS_ARG
    PHASES = ("pe", "blocks")
    Hooks = Hooks

    def video_heads(self, diffusion_model) -> int:
        return diffusion_model.num_attention_heads

    def plan_dims(self, diffusion_model, compute_dtype=None) -> memory_plan.ModelDims:
        return plan_dims(diffusion_model, compute_dtype)

    def rotary_patches(self, model) -> list:
        return rotary_patches(model)

    def in_place_projections(self, model) -> list:
        return in_place_projections(model)

    def in_place_values(self, model, options: dict) -> list:
        return in_place_values(model, options)
