"""Sequence-parallel LTXAV forward over W ranks with xfuser (xDiT): pad -> shard -> run -> gather.

Each rank holds 1/W of the video tokens through the whole transformer; audio tokens (about 25 a
second) stay whole on every rank. ComfyUI's own ``LTXAVModel._forward`` still runs the forward; for
the duration of one call a DIFFUSION_MODEL wrapper sets a few instance attributes so that:

* ``_process_input`` patchifies as usual but projects (``patchify_proj``) only this rank's tokens;
  positions are sliced the same way, so ComfyUI's PE code only ever sees the local slice;
* ``_prepare_timestep`` sends ComfyUI's adaLN code the distinct timestep values (2 for
  image-to-video) instead of one per token, and blocks index them per local token
  (``LocalTimestep``): no rank holds a full-sequence timestep tensor;
* video self-attention: Ulysses alone is an all-to-all in xfuser's layout around ComfyUI's own
  attention function (all heads in one call; q/k/v's own buffers receive; this rank's own query
  block runs while the other ranks' queries are in flight); with a ring degree it goes through
  xfuser's ``xFuserLongContextAttention``, with a kernel that drops the padding keys;
* audio-to-video cross-attention is local (video queries, all audio keys); video-to-audio
  cross-attention merges each rank's partial softmax (output + log-sum-exp) over its own video
  keys, which is exact;
* ``proj_out`` gathers the 128-channel output of every rank, so ComfyUI's keyframe scatter and
  unpatchify run on the whole latent, which is small;
* the host does not wait for the GPU inside a text-to-video forward: video positions (without
  guides) are computed on the host, as are the double-precision RoPE grids, and both cross to the
  GPU once per sampling run (``RunConstants``), not once per step; each such copy makes the host
  wait for the GPU queue to drain. Image-to-video reads the mask once, not once per latent frame.

Padding: the token count is padded to a multiple of W at the end of the sequence; padding keys are
marked NaN inside self-attention and dropped by the attention kernel, and padding queries' outputs
are cut off at the gather, so real tokens never see padding.

Guide attenuation masks (LTXVAddGuide with strength < 1) take a slower path: ComfyUI builds its
N x N bias as on one GPU, and video self-attention gathers K/V for the local query rows.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import math

import torch
import torch.distributed as dist

from . import instrumentation, xfuser_compat
from .ffn_chunking import instance_attrs, may_overwrite, transformer_options_of

WRAPPER_KEY = "ltxav_sequence_parallel"
# Anything that is not a yunchang AttnType makes xfuser call our ``attn_processor`` as the kernel.
_PROCESSOR_ATTN_TYPE = "ltxav_pack_kernel"
_ROLE = contextvars.ContextVar("ltxav_sp_attention_role", default=None)


# --------------------------------------------------------------------------- checks

@dataclasses.dataclass(frozen=True)
class Degrees:
    """Sequence-parallel degrees: ``ulysses * ring`` ranks."""

    ulysses: int
    ring: int = 1

    @property
    def world(self) -> int:
        return self.ulysses * self.ring


def check_degrees(degrees: Degrees, world: int, video_heads: int, node: str) -> None:
    """Raise a message naming ``node`` when the degrees cannot run ``world`` ranks."""
    if degrees.ulysses < 1 or degrees.ring < 1:
        raise ValueError(f"{node}: ulysses_degree and ring_degree must be >= 1 "
                         f"(got {degrees.ulysses} and {degrees.ring}).")
    if degrees.world != world:
        raise ValueError(f"{node}: ulysses_degree x ring_degree = {degrees.ulysses} x {degrees.ring} = "
                         f"{degrees.world}, but {world} GPUs are used; pick degrees whose product is {world} "
                         f"(e.g. ulysses_degree={world}, ring_degree=1).")
    if video_heads % degrees.ulysses:
        fits = [d for d in range(1, world + 1) if world % d == 0 and video_heads % d == 0]
        raise ValueError(f"{node}: ulysses_degree={degrees.ulysses} does not divide the model's {video_heads} "
                         f"video attention heads; use a ulysses_degree from {fits} and put the rest in ring_degree.")


def require_ltxav(diffusion_model, node: str):
    from comfy.ldm.lightricks.av_model import LTXAVModel

    if not isinstance(diffusion_model, LTXAVModel):
        raise ValueError(f"{node}: the model is a {type(diffusion_model).__name__}, not LTX-2 audio-video (LTXAV); "
                         "sequence-parallel sampling supports LTXAV checkpoints only.")
    return diffusion_model


# --------------------------------------------------------------------------- layout

@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """``total`` tokens padded to ``local * world``; rank r holds padded tokens [r*local, (r+1)*local).

    Requires every rank to hold at least one real token (``total > (world - 1) * local``)."""

    total: int
    world: int
    rank: int

    @property
    def local(self) -> int:
        return math.ceil(self.total / self.world)

    @property
    def start(self) -> int:
        return self.rank * self.local

    @property
    def real(self) -> int:
        """Real (non-padding) tokens on this rank."""
        return max(0, min(self.local, self.total - self.start))

    @property
    def pad(self) -> int:
        return self.local * self.world - self.total

    def check(self, node: str = "Sequence parallel") -> None:
        last_real = self.total - (self.world - 1) * self.local
        if last_real < 1:
            raise ValueError(f"{node}: the video has {self.total} tokens, too few to split over {self.world} GPUs "
                             f"(the last one would get none); use fewer GPUs or a longer/larger video.")

    def take(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of ``t`` along ``dim``, padded to ``local`` by repeating its last element."""
        part = t.narrow(dim, self.start, self.real)
        if self.real == self.local:
            return part
        fill = part.narrow(dim, self.real - 1, 1)
        shape = list(t.shape)
        shape[dim] = self.local - self.real
        return torch.cat([part, fill.expand(shape)], dim=dim)

    def gather(self, t: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
        """All ranks' slices, concatenated along ``dim`` without the padding."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.total)


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


# --------------------------------------------------------------------------- per-run constants

class RunConstants:
    """Tensors that stay the same through a sampling run but that ComfyUI's forward makes again on
    every step: token positions (computed on the host here) and the double-precision RoPE grids.
    A copy from pageable host memory to the GPU makes the host wait until the GPU has run everything
    queued, and the GPU then idles while the host queues the next kernels; here each crosses once a
    run, and is reused while its host value is equal and nothing has written to the device copy."""

    def __init__(self):
        self._kept: dict = {}

    def clear(self) -> None:
        self._kept.clear()

    def host(self, key, make):
        """``make()``'s tensor, made once and reused while nothing has written to it."""
        key = ("host", key)
        kept = self._kept.get(key)
        if kept is not None and kept[0]._version == kept[1]:
            return kept[0]
        t = make()
        self._kept[key] = (t, t._version)
        return t

    def on(self, device: torch.device, key, host: torch.Tensor) -> torch.Tensor:
        """``host`` on ``device``: the kept copy when it still holds the same values, else a new one."""
        if host.device == device:
            return host
        key = (str(device), key)
        kept = self._kept.get(key)
        if kept is not None:
            src, dev, version = kept
            if dev._version == version and src.dtype == host.dtype and torch.equal(src, host):  # equal: same shape too
                return dev
        dev = host.to(device)
        self._kept[key] = (host.clone(), dev, dev._version)
        return dev


# --------------------------------------------------------------------------- attention kernel

_CUDNN_LSE = [True]  # cleared for the process when cuDNN's attention refuses (old build, unsupported GPU)


def _cudnn_with_lse(qt, kt, vt, softmax_scale):
    """cuDNN's attention ([B, H, S, D]) and its log-sum-exp [B, H, S], or (None, None): the kernel
    PyTorch's own SDPA picks for ComfyUI on Hopper, faster there than the flash kernel."""
    if not _CUDNN_LSE[0]:
        return None, None
    try:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False,
                                                                     scale=softmax_scale)[:2]
    except (RuntimeError, AttributeError):
        _CUDNN_LSE[0] = False
        return None, None
    return out, lse.reshape(qt.shape[:3])


def attention_with_lse(q, k, v, softmax_scale=None):
    """softmax(q k^T) v and its log-sum-exp (float32, for exact merging of partial results).
    q, k, v: [B, S, H, D]; returns [B, S, H, D] and [B, H, S]."""
    if k.shape[1] == 0:
        return torch.zeros_like(q), q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    aten = torch.ops.aten
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False, scale=softmax_scale)[:2]
    elif q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = _cudnn_with_lse(qt, kt, vt, softmax_scale)
        if out is None:
            out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False, scale=softmax_scale)[:2]
    else:
        out, lse = aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, False,
                                                                scale=softmax_scale)[:2]
        lse = lse[..., :q.shape[1]]
    return out.transpose(1, 2), lse.float()


class PaddingDroppingKernel:
    """The attention kernel handed to xfuser: drops NaN-marked padding keys, which are always a
    suffix of whatever key block it gets (padding sits at the end of the sequence)."""

    def __init__(self):
        self.padding = False

    def __call__(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        if self.padding:
            real = int((~torch.isnan(k[0, :, 0, 0])).sum())
            k, v = k[:, :real], v[:, :real]
        return attention_with_lse(q, k, v, softmax_scale)


# Ulysses: heads per all-to-all + attention call. Beyond ComfyUI's own q/k/v (which receive) a rank
# holds one sample's send buffer while its own query block runs (with that call's output and ComfyUI's
# reshaped copy of it), then its own blocks' outputs while the other ranks' blocks run (for one sample,
# at most twice q). One group runs the fewest, largest kernels; its peak stays under RoPE's.
HEAD_GROUPS = 1
# ring: xfuser's attention allocates per call, so it gets a quarter of the heads at a time
RING_HEAD_GROUPS = 4


def head_group_size(heads: int, ulysses: int, groups: int) -> int:
    """Largest head count that divides ``heads``, is a multiple of ``ulysses`` and is at most
    ``max(ulysses, heads // groups)``."""
    cap = max(ulysses, heads // groups)
    return max(g for g in range(ulysses, cap + 1, ulysses) if heads % g == 0)


def others(world: int, me: int) -> list[tuple[int, int]]:
    """The ranks other than ``me`` as at most two contiguous ranges [lo, hi)."""
    return [(lo, hi) for lo, hi in ((0, me), (me + 1, world)) if hi > lo]


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its last dim read as 8-byte elements when its strides allow (else ``t``): a strided
    copy of bf16 moves one element per step, so the same permuted copy takes 4x fewer steps."""
    if t.dim() and t.element_size() < 8 and t.stride(-1) == 1:
        try:
            return t.view(torch.int64)
        except RuntimeError:  # odd sizes, strides or offset
            pass
    return t


def head_blocks(t: torch.Tensor, groups: int, world: int, last: int | None = None) -> torch.Tensor:
    """``t`` [B, L, H, D] (this rank's tokens, all heads) -> a new [B, G, W, L, h, D]: per sample and
    head group, one contiguous block per rank holding that rank's ``h = H/G/W`` heads, in rank order
    (yunchang's ``all_to_all_4D`` layout, which xfuser uses), or with rank ``last``'s block moved to
    the end."""
    b, n, h, d = t.shape
    share = h // groups // world
    out = t.new_empty((b, groups, world, n, share, d))
    blocks = t.view(b, n, groups, world, share, d).permute(0, 2, 3, 1, 4, 5)
    at = 0
    for lo, hi in [(0, world)] if last is None else [*others(world, last), (last, last + 1)]:
        wide(out[:, :, at:at + hi - lo]).copy_(wide(blocks[:, :, lo:hi]))
        at += hi - lo
    return out


def receiving(t: torch.Tensor, shape, reuse: bool = True) -> torch.Tensor:
    """``t``'s own buffer viewed as ``shape`` when ``reuse`` and ``t`` is a temporary of the caller
    that it drops after this call (``may_overwrite``), else a new buffer of that shape."""
    return t.view(shape) if reuse and may_overwrite(t, whole_view=True) else t.new_empty(shape)


def heads_from_sequence_shards(t: torch.Tensor, groups: int, pg, reuse: bool = True) -> torch.Tensor:
    """Ulysses all-to-all of ``t`` [B, L, H, D] (this rank's tokens, all heads) -> [B, G, W*L, h, D]:
    for each sample and head group, all tokens of this rank's heads of that group, each slice
    contiguous. One copy (the send buffer); when ``reuse`` and ``t`` is a temporary of the caller
    (``may_overwrite``) its own buffer receives."""
    world = dist.get_world_size(pg)
    b, n = t.shape[:2]
    send = head_blocks(t, groups, world)
    recv = receiving(t, send.shape, reuse)
    for i in range(b):
        for g in range(groups):
            dist.all_to_all_single(recv[i, g], send[i, g], group=pg)
    return recv.view(b, groups, world * n, *send.shape[4:])


# --------------------------------------------------------------------------- process groups

def init_process_groups(rank: int, world: int, degrees: Degrees, backend: str, init_method: str,
                        store=None) -> None:
    """torch.distributed + xfuser's groups (sequence parallel = Ulysses x ring) for this process.
    With ``store`` (a ``TCPStore`` the caller made) the ranks meet there and ``init_method`` only
    names it."""
    xf = xfuser_compat.load()
    if not dist.is_initialized():
        if store is None:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    local = torch.cuda.current_device() if torch.cuda.is_available() else rank  # the device xfuser's groups name
    xf.parallel_state.init_distributed_environment(world_size=world, rank=rank, backend=backend,
                                                   distributed_init_method=init_method, local_rank=local)
    xf.parallel_state.initialize_model_parallel(sequence_parallel_degree=world, ulysses_degree=degrees.ulysses,
                                                ring_degree=degrees.ring, backend=backend)


def destroy_process_groups() -> None:
    xf = xfuser_compat.load()
    if xf.parallel_state.model_parallel_is_initialized():
        xf.parallel_state.destroy_model_parallel()
    xf.parallel_state.destroy_distributed_environment()


# --------------------------------------------------------------------------- the forward

def _tagged_forward(role, module, *args, **kwargs):
    token = _ROLE.set(role)
    try:
        return type(module).forward(module, *args, **kwargs)
    finally:
        _ROLE.reset(token)


class SequenceParallel:
    """This process's part of a sequence-parallel LTXAV forward; create after ``init_process_groups``."""

    def __init__(self, rank_label: int | None = None, phase_stats: bool = False):
        xf = xfuser_compat.load()
        ps = xf.parallel_state
        self.group = ps.get_sp_group().device_group
        self.rank = ps.get_sequence_parallel_rank()
        self.world = ps.get_sequence_parallel_world_size()
        self.ulysses = ps.get_ulysses_parallel_world_size()
        self.ring = ps.get_ring_parallel_world_size()
        self.rank_label = self.rank if rank_label is None else rank_label
        self.kernel = PaddingDroppingKernel()
        self.attention = xf.xFuserLongContextAttention(attn_type=_PROCESSOR_ATTN_TYPE, attn_processor=self.kernel)
        self.merge = xf.update_out_and_lse
        # phase_stats: keep per-phase allocation peaks (host-side allocator counters, no device sync)
        self.phase_stats = phase_stats and torch.cuda.is_available()
        self.stats: dict[str, int] = {}
        self.constants = RunConstants()

    def reset_stats(self) -> None:
        """Start of a sampling run: forget the last run's peaks and constants."""
        self.stats = {}
        self.constants.clear()

    def _record(self, name: str, base: int) -> None:
        peak = torch.cuda.max_memory_allocated() - base
        self.stats[name] = max(self.stats.get(name, 0), peak)
        self.stats["peak"] = max(self.stats.get("peak", 0), peak)

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        """ComfyUI DIFFUSION_MODEL wrapper: run this forward sequence-parallel."""
        model = require_ltxav(executor.class_obj, "Sequence parallel")
        call = _Call(self, model)
        args, kwargs = call.with_attention_override(args, kwargs)
        with call.installed():
            out = executor(*args, **kwargs)
        if self.phase_stats:
            self._record("output", call.base)
        return out


class _Call:
    """State of one sequence-parallel forward (the layout is known once inputs are patchified)."""

    def __init__(self, sp: SequenceParallel, model):
        self.sp = sp
        self.model = model
        self.layout: ShardLayout | None = None
        self.outer_override = None
        self.model_rope_grid = model.freq_grid_generator
        self.base = 0
        if sp.phase_stats:
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    # -- installation -------------------------------------------------------
    def with_attention_override(self, args, kwargs):
        to = transformer_options_of(args, kwargs)
        self.outer_override = to.get("optimized_attention_override")
        to = {**to, "optimized_attention_override": self.attention_override}
        if "transformer_options" in kwargs:
            return args, {**kwargs, "transformer_options": to}
        return (*args[:5], to, *args[6:]), kwargs

    def installed(self):
        m = self.model
        pairs = [
            (m, "_process_input", self.process_input),
            (m, "_prepare_timestep", self.prepare_timestep),
            (m, "_build_guide_self_attention_mask", self.build_guide_mask),
            (m.proj_out, "forward", self.proj_out_gathered),
            (m, "freq_grid_generator", self.rope_grid),
        ]
        if instrumentation.enabled() or self.sp.phase_stats:
            pairs += [(m, "_prepare_positional_embeddings", self.phase(m._prepare_positional_embeddings, "pe",
                                                                        instrumentation.pe_generated)),
                      (m, "_process_transformer_blocks", self.phase(m._process_transformer_blocks, "blocks",
                                                                    instrumentation.blocks_complete))]
        for block in m.transformer_blocks:
            pairs.append((block.attn1, "forward", functools.partial(_tagged_forward, "video_self", block.attn1)))
            pairs.append((block.video_to_audio_attn, "forward",
                          functools.partial(_tagged_forward, "video_to_audio", block.video_to_audio_attn)))
        return instance_attrs(pairs)

    def phase(self, fn, name, report):
        """``fn`` followed by its peak (phase_stats) and its log line (LTXAV_PARALLEL_MEMORY_LOG)."""
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            if instrumentation.enabled():
                report(self.sp.rank_label, self.model.patchify_proj.weight.device)
            if self.sp.phase_stats:
                self.sp._record(name, self.base)
                torch.cuda.reset_peak_memory_stats()
            return out
        return run

    # -- inputs -------------------------------------------------------------
    def process_input(self, x, keyframe_idxs, denoise_mask, **kwargs):
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
        self.layout = layout = ShardLayout(vx.shape[1], self.sp.world, self.sp.rank)
        layout.check()
        self.sp.kernel.padding = layout.pad > 0
        vx = m.patchify_proj(layout.take(vx))
        v_coords = layout.take(v_coords, dim=2)
        if on_host:
            v_coords = self.sp.constants.on(vx.device, ("video positions", tuple(v_coords.shape)), v_coords)
        return [vx, ax], [v_coords, a_coords], extra

    def latent_positions_on_host(self, f, h, w, b, device):
        """ComfyUI's patchifier positions, made on the host once a run (``device`` is not used)."""
        p = self.model.patchifier
        return self.sp.constants.host(("latent positions", f, h, w, b),
                                      lambda: type(p).get_latent_coords(p, f, h, w, b, "cpu"))

    def rope_grid(self, theta, n_dims, dim, device):
        """The model's RoPE frequency grid; the double-precision one is made on the host: kept on the device."""
        grid = self.model_rope_grid(theta, n_dims, dim, device)
        return self.sp.constants.on(torch.device(device), ("rope grid", theta, n_dims, dim), grid)

    def prepare_timestep(self, timestep, batch_size, hidden_dtype, **kwargs):
        m = self.model
        prepare = functools.partial(type(m)._prepare_timestep, m)
        if timestep.dim() < 2 or timestep.shape[1] == 1:  # one value per sample: nothing grows with length
            return prepare(timestep, batch_size, hidden_dtype, **kwargs)
        grid_mask = kwargs.pop("grid_mask", None)
        if grid_mask is not None:
            timestep = timestep[:, grid_mask]
        values, index = distinct_values(timestep.reshape(timestep.shape[0], timestep.shape[1]))
        index = self.layout.take(index)
        kwargs["has_spatial_mask"] = True  # values are not laid out per frame: no per-frame compression
        (v_t, a_t, cross, v_p, a_p), (v_emb, a_emb), rest = prepare(values, batch_size, hidden_dtype, **kwargs)
        local = make_local_timestep
        v_t = local(v_t.data, index)
        v_emb = local(v_emb.data, index)
        if cross:
            cross = [cross[0], local(cross[1].data, index), local(cross[2].data, index), cross[3]]
        return [v_t, a_t, cross, v_p, a_p], [v_emb, a_emb], rest

    def build_guide_mask(self, x, transformer_options, merged_args):
        vx = x[0]
        stand_in = vx.new_empty((vx.shape[0], self.layout.total, 0))
        mask = type(self.model)._build_guide_self_attention_mask(self.model, [stand_in], transformer_options,
                                                                 merged_args)
        return None if mask is None else self.layout.take(mask, dim=2)

    # -- output -------------------------------------------------------------
    def proj_out_gathered(self, x):
        y = type(self.model.proj_out).forward(self.model.proj_out, x)
        return self.layout.gather(y, self.sp.group)

    # -- attention ----------------------------------------------------------
    def attention_override(self, func, q, k, v, heads, mask=None, **kwargs):
        role = _ROLE.get()
        if role == "video_self":
            return self.video_self_attention(func, q, k, v, heads, mask, kwargs)
        if role == "video_to_audio":
            return self.video_to_audio_attention(func, q, k, v, heads, mask, kwargs)
        return self.kernel_call(func, q, k, v, heads, mask, kwargs)

    def video_self_attention(self, func, q, k, v, heads, mask, kwargs):
        layout = self.layout
        if mask is not None:  # guide attenuation
            return self.gathered_attention(func, q, k, v, heads, mask, kwargs)
        b, n, inner = q.shape
        shape = (b, n, heads, inner // heads)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if self.sp.ring == 1:
            group = head_group_size(heads, self.sp.ulysses, HEAD_GROUPS)
            return self.ulysses_attention(func, q, k, v, group, kwargs).view(b, n, inner)
        group = head_group_size(heads, self.sp.ulysses, RING_HEAD_GROUPS)
        # ComfyUI's CrossAttention makes q (to_q, q_norm, RoPE) for this call and drops it after; RoPE's
        # reshape leaves it a view of a private copy
        out = receiving(q, q.shape)
        if layout.real < n:
            k[:, layout.real:] = float("nan")  # padding keys: dropped by PaddingDroppingKernel
        for h in range(0, heads, group):
            s = slice(h, h + group)
            out[:, :, s] = self.sp.attention(None, q[:, :, s], k[:, :, s], v[:, :, s])
        return out.reshape(b, n, inner)

    def ulysses_attention(self, func, q, k, v, group, kwargs):
        """Ulysses, ``group`` heads at a time: all-to-all from [B, L, H, D] sequence shards to head
        shards over the whole sequence, ComfyUI's own attention (padding keys cut off the end), and
        back. Keys and values go first; while the other ranks' queries travel, this rank's own query
        block (its tokens, its heads) runs, and only the other blocks make the round trip. ComfyUI's
        CrossAttention drops q, k and v after this call, so when they are its own temporaries they
        hold the gathered heads, the other blocks and their way back land in q's, the output in k's."""
        pg = self.sp.attention.ulysses_pg
        world, total, me = self.sp.ulysses, self.layout.total, dist.get_rank(pg)
        b, n, heads, d = q.shape
        groups = heads // group
        share = group // world
        hd = share * d
        reuse = len({t.untyped_storage().data_ptr() for t in (q, k, v)}) == 3  # never overwrite a shared buffer
        kf, vf = (heads_from_sequence_shards(t, groups, pg, reuse) for t in (k, v))  # [B, G, W*L, h, D]
        land = receiving(q, (b, groups, world, n, share, d), reuse)
        splits = [0 if w == me else n for w in range(world)]  # nothing goes to or comes from this rank
        own, back = [], []
        for i in range(b):  # one sample at a time: each slice is contiguous, no copy for the kernel
            send = head_blocks(q[i:i + 1], groups, world, last=me)[0]  # [G, W, L, h, D], the other ranks' first
            for g in range(groups):
                keys = kf[i, g, :total].view(1, total, hd), vf[i, g, :total].view(1, total, hd)
                rest = land[i, g, :world - 1].view((world - 1) * n, hd)  # the other ranks' blocks, in rank order
                arriving = dist.all_to_all_single(rest, send[g, :world - 1].view(rest.shape), splits, splits,
                                                  group=pg, async_op=True)
                own.append(self.kernel_call(func, send[g, world - 1].view(1, n, hd), *keys, share, None, kwargs))
                arriving.wait()
                del arriving
                if g == groups - 1:
                    del send  # before the other blocks' attention: the peak stays that of one call
                o = self.kernel_call(func, rest.view(1, -1, hd), *keys, share, None, kwargs)
                back.append(dist.all_to_all_single(rest, o.view(rest.shape), splits, splits, group=pg,
                                                   async_op=True))
                del o
        out = kf.view(q.shape)  # k's buffer, or the one that received k
        view = out.view(b, n, groups, world, share, d)
        for j, o in enumerate(own):  # while the last blocks travel back
            wide(view[j // groups, :, j % groups, me]).copy_(wide(o.view(n, share, d)))
        del own
        for work in back:
            work.wait()
        for lo, hi in others(world, me):
            at = lo - (lo > me)  # where rank lo's block sits among the others
            wide(view[:, :, :, lo:hi]).copy_(wide(land[:, :, at:at + hi - lo].permute(0, 3, 1, 2, 4, 5)))
        return out

    def gathered_attention(self, func, q, k, v, heads, mask, kwargs):
        """With a mask (its rows are this rank's queries): all ranks' keys and values, then the kernel."""
        k = self.layout.gather(k, self.sp.group)
        v = self.layout.gather(v, self.sp.group)
        return self.kernel_call(func, q, k, v, heads, mask, kwargs)

    def kernel_call(self, func, q, k, v, heads, mask, kwargs):
        """ComfyUI's attention function (or an override another node installed)."""
        if self.outer_override is not None:
            return self.outer_override(func, q, k, v, heads, mask=mask, **kwargs)
        return func(q, k, v, heads, mask=mask, **kwargs)

    def video_to_audio_attention(self, func, q, k, v, heads, mask, kwargs):
        """Audio queries (whole, every rank) over video keys (sharded): exact merge of partial softmaxes."""
        if mask is not None:
            return self.gathered_attention(func, q, k, v, heads, mask, kwargs)
        b, t, inner = q.shape
        real = self.layout.real
        d = inner // heads
        out, lse = attention_with_lse(q.reshape(b, t, heads, d), k[:, :real].reshape(b, real, heads, d),
                                      v[:, :real].reshape(b, real, heads, d))
        # one all-gather for both: output and log-sum-exp as bytes, side by side
        packed = torch.cat([out.contiguous().view(torch.uint8).flatten(), lse.contiguous().view(torch.uint8).flatten()])
        gathered = [torch.empty_like(packed) for _ in range(self.sp.world)]
        dist.all_gather(gathered, packed, group=self.sp.group)
        merged, merged_lse = None, None
        cut = out.numel() * out.element_size()
        for g in gathered:
            o, s = g[:cut].view(out.dtype).view(out.shape), g[cut:].view(lse.dtype).view(lse.shape)
            merged, merged_lse = self.sp.merge(merged, merged_lse, o, s)
        return merged.to(q.dtype).reshape(b, t, inner)
