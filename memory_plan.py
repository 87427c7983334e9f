"""Peak device memory of one worker, predicted before sampling starts: model-free arithmetic on the
numbers a model family gives (``models``: its ``plan_dims`` with its ``Coefficients``, its
``LatentGeometry``; LTX-2's are ``models/ltxav_plan.py``).

A worker holds the model (weights are not sharded; with ComfyUI's DynamicVRAM only the blocks in use
stay on the GPU) and, through every block, its share of the video tokens (``xdit_context_parallel``);
audio stays whole on every rank. Its peak is

    weights + cast buffer + fixed + max(attention phase, FFN phase) [+ sampler state]

with per-token costs counted in *hidden vectors* (one token's ``video_dim`` activations in the
compute dtype), the family's ``Coefficients``. What does not depend on the model is here:

* fp8 (or any cast) weights: one block linear cast to the compute dtype at a time; GGUF weights count
  as stored (quantized), their casts by their elements, with ComfyUI-GGUF's float16 dequantization;
* weights: all of them, unless ComfyUI streams them (DynamicVRAM, its default on NVIDIA): then only
  what is on the GPU at the peak, the block running and the next one arriving, as stored; the parts
  outside the blocks (connectors, adaLN, patchify, output) stream too and run before and after the
  blocks, not at the peak. Measured in ComfyUI's process on one H100 (48 layers, 2026-12-06):
  DynamicVRAM held 0.85 GiB (fp8) and 1.57 GiB (bf16) after the longest clips, two blocks plus 0.13.
  Weights stored in another dtype than the compute dtype (fp8) add ComfyUI's casts in PyTorch's pool:
  PyTorch's peak was 2.66 GiB above bf16's for the same clip at three lengths and both card sizes,
  3.7 blocks' linears in bf16, counted as STREAMED_CAST_BLOCKS;
* the sampler's state: float32 copies of the packed latent (the family's elements a token).

The FFN Chunker's ``auto`` and the parallel sampler's refusal both use this module.
"""
from __future__ import annotations

import dataclasses
import math

GIB = 1 << 30
# a process's CUDA context (measured 0.52 GiB, torch 2.11, H100 and H200): outside PyTorch's allocator, so a
# card's free memory already leaves it out, but an emulated card's share (LTXAV_PARALLEL_MEMORY_CAP_GIB) holds it
CUDA_CONTEXT_BYTES = int(0.52 * GIB)
# NCCL's buffers for an all-to-all, per peer: not measured here (no machine with several GPUs); NVIDIA/nccl#1685
# reports 3.28 GB more on each of 8 H100s after the first all_to_all_single (32 channels a pair), 0.47 GiB a peer
NCCL_PEER_BYTES = int(0.47 * GIB)
LEAN_RANGE_TOKENS = 16384  # lean_attention.QUERY_CHUNK_TOKENS: the tokens of one range of the lean attention
# the in-place Ulysses exchange's two staging buffers (send and receive), each of this many bytes
SWAP_STAGING_BYTES = 64 << 20
# ComfyUI's sampler keeps four float32 copies of the packed latent (noise, latent, denoised and the step's x) ...
SAMPLER_COPIES = 4
# ... and nine through the forward with the lean attention (calc_cond_batch's input and its parts, the noise,
# the latent and the step's x: the live blocks at 8,301 frames)
LEAN_SAMPLER_COPIES = 9
# weights streamed by DynamicVRAM (see the module docstring): blocks resident as stored, and blocks'
# linears cast to the compute dtype in PyTorch's pool when stored in another dtype (measured 3.7)
STREAMED_RESIDENT_BLOCKS = 2
STREAMED_CAST_BLOCKS = 4
# the card's edge: the allocator's pool above PyTorch's peak is not planned. With streamed weights every
# clip (stock and the node, 16 and 24 GiB, fp8 and bf16, both sizes; one H100 and one H200) whose plan left
# at most 1.17 GiB of the free memory ran out of memory, and every clip that left 1.41 or more ran
EDGE_BYTES = int(1.5 * GIB)
# auto FFN chunking: at most this many tokens per chunk (a chunk still saturates a GPU matmul) ...
FFN_MAX_TOKENS_PER_CHUNK = 4096
# ... and a chunk's 4x activations use at most this share of the free device memory
FFN_FREE_MEMORY_SHARE = 1 / 8
FFN_MAX_CHUNKS = 128


@dataclasses.dataclass(frozen=True)
class Coefficients:
    """A family's per-token costs in hidden vectors per local video token (how they were measured: the
    family's module, e.g. ``models/ltxav_plan.py``)."""

    attention: float  # the attention phase's peak on one GPU
    attention_out_in_place: float  # less, with W > 1: the attention output goes into a q/k/v buffer
    ring: float  # more, with a ring degree (xfuser's float32 accumulators)
    full_sequence: float  # per token of the *whole* sequence
    ffn_kept: float  # the FFN phase: kept beside one chunk's activations
    per_token_timestep: float  # per-token timesteps (image-to-video, guides)
    fixed_bytes: int  # context, connector, kernels' workspaces
    lean_attention: float  # the attention phase with the lean attention (``lean_attention``) ...
    lean_gated: float  # ... more with gated attention ...
    lean_exchange: float  # ... and over several ranks ...
    lean_range: float  # one range's temporaries, of up to LEAN_RANGE_TOKENS local tokens
    lean_pool: float  # the allocator's pool beyond PyTorch's peak, with the lean attention
    lean_value: float = 0.0  # less when self-attention's value goes into its input's buffer


@dataclasses.dataclass(frozen=True)
class LatentGeometry:
    """How a family's latent maps to pixels and tokens."""

    time_stride: int  # pixel frames a latent frame after the first
    space_stride: int  # pixels a latent cell, each way
    audio_per_second: float  # audio latents a second (0: no audio)
    video_elements: int  # latent elements of a video token as the sampler holds it
    audio_elements: int  # ... and of an audio token

    def frames(self, latent_frames: int) -> int:
        return (latent_frames - 1) * self.time_stride + 1

    def clip(self, frames: int, width: int, height: int, fps: float = 25.0, audio: bool = True) -> Clip:
        """The latent of a ``frames`` x ``width`` x ``height`` video (and its audio) at ``fps``."""
        s = self.space_stride
        tokens = math.ceil(round(frames * self.audio_per_second / fps, 6)) if audio else 0
        return Clip((frames - 1) // self.time_stride + 1, height // s, width // s, tokens, geometry=self)

    def latent_elements(self, clip: Clip) -> int:
        """Elements of the sampler's packed latent for one sample of ``clip``."""
        return self.video_elements * clip.video_tokens + self.audio_elements * clip.audio_tokens

    def latent_clip(self, latent) -> tuple[Clip, int]:
        """The planner's view of a sampler's latent ([B, C, F, H, W] video, or a nested video + audio
        [B, C, T, ...]): its clip and batch size."""
        parts = latent.unbind() if getattr(latent, "is_nested", False) else [latent]
        video = parts[0]
        audio = parts[1].shape[2] if len(parts) > 1 else 0
        return Clip(video.shape[2], video.shape[3], video.shape[4], audio, geometry=self), video.shape[0]


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """What the plan needs of a model: its family's ``plan_dims`` (hidden sizes, its ``Coefficients``) and
    its weights as ``weight_figures`` counts them."""

    video_dim: int
    audio_dim: int
    planner: Coefficients
    ffn_mult: int = 4
    weight_bytes: int = 0  # every parameter and buffer as stored (fp8, bf16 ...)
    cast_bytes: int = 0  # a weight cast to the compute dtype on the fly: the largest block linear
    compute_bytes: int = 2  # element size of the activations (bf16 = 2)
    block_bytes: int = 0  # the largest transformer block's parameters as stored
    blocks_bytes: int = 0  # all transformer blocks' parameters as stored
    block_cast_bytes: int = 0  # the largest block's linear weights in the compute dtype, if stored in another
    gated_attention: bool = False  # LTX-2.3: attention outputs scaled by per-head gates into a new tensor

    @property
    def streamed_weight_bytes(self) -> int:
        """Weights on the GPU at the peak while ComfyUI streams the others from host memory
        (DynamicVRAM): the block running and the next one arriving, as stored."""
        if not self.block_bytes:
            return self.weight_bytes
        return min(self.weight_bytes, STREAMED_RESIDENT_BLOCKS * self.block_bytes)

    @property
    def streamed_cast_bytes(self) -> int:
        """ComfyUI's casts of streamed weights stored in another dtype (fp8) in PyTorch's pool."""
        return max(self.cast_bytes, STREAMED_CAST_BLOCKS * self.block_cast_bytes)

    @property
    def vector(self) -> int:
        return self.video_dim * self.compute_bytes

    @property
    def ffn_bytes_per_token(self) -> int:
        """One token's FFN activations at their peak: the 4x projection and its GELU."""
        return 2 * self.ffn_mult * self.vector


def cast_bytes(weight, compute_dtype, compute_bytes: int) -> int:
    """Bytes ComfyUI allocates to run a linear whose ``weight`` is stored in another dtype than
    ``compute_dtype`` (0 when it is stored in it): the weight in the compute dtype, by its elements (a
    GGUF weight's ``shape`` is its logical one; ``numel`` counts its stored bytes). ComfyUI-GGUF
    dequantizes a quantized weight to float16 first (its blocks' scales are float16), then casts: both
    are held at the cast (dequant.py, ``dequantize_tensor``)."""
    if weight.dtype == compute_dtype:
        return 0
    elements = math.prod(weight.shape)
    return elements * (compute_bytes + (GGUF_DEQUANT_BYTES if gguf_quantized(weight) else 0))


GGUF_DEQUANT_BYTES = 2  # ComfyUI-GGUF's dequantized weight before its cast: float16
# ComfyUI-GGUF's tensor types that torch holds as they are (gguf.GGMLQuantizationType F32 and F16)
GGUF_PLAIN_TYPES = (0, 1)


def gguf_quantized(weight) -> bool:
    """A ComfyUI-GGUF weight in a quantized type (read by attribute: ComfyUI-GGUF is not imported)."""
    t = getattr(weight, "tensor_type", None)
    return t is not None and int(t) not in GGUF_PLAIN_TYPES


def weight_figures(model, blocks, compute_dtype=None) -> dict:
    """``ModelDims``' weight fields of ``model`` (a torch module) whose transformer ``blocks`` (a list of
    modules) run one after the other; ``compute_dtype``: the dtype it runs in (ComfyUI's
    ``get_dtype_inference()``), default its blocks' linear weights' dtype. Weights count as stored (a GGUF
    weight's quantized blocks); casts by their elements (a GGUF weight's logical shape), see ``cast_bytes``."""
    import torch

    weight_bytes = sum(p.numel() * p.element_size() for p in list(model.parameters()) + list(model.buffers()))
    linears = [m.weight for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    compute_dtype = compute_dtype or (linears[0].dtype if linears else torch.float32)
    compute_bytes = torch.empty((), dtype=compute_dtype).element_size()
    block_sizes = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
    block_casts = [sum(cast_bytes(m.weight, compute_dtype, compute_bytes) for m in b.modules()
                       if isinstance(m, torch.nn.Linear)) for b in blocks]
    return dict(weight_bytes=weight_bytes, compute_bytes=compute_bytes,
                cast_bytes=max((cast_bytes(w, compute_dtype, compute_bytes) for w in linears), default=0),
                block_bytes=max(block_sizes, default=0), blocks_bytes=sum(block_sizes),
                block_cast_bytes=max(block_casts, default=0))


@dataclasses.dataclass(frozen=True)
class Clip:
    """The latent being sampled: video [frames, height, width] in latent cells, audio length, and the
    family's ``geometry`` (``LatentGeometry.clip`` / ``latent_clip`` give it)."""

    latent_frames: int
    latent_height: int
    latent_width: int
    audio_tokens: int = 0
    # a Clip(...) made by hand without its family's geometry (tests, benchmarks) has LTX-2's: the driver asks
    # the family (``Family.latent_clip``); tests/test_model_family.py keeps the two equal
    geometry: LatentGeometry = LatentGeometry(8, 32, 25.0, 128, 128)

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.latent_height * self.latent_width

    @property
    def frames(self) -> int:
        return self.geometry.frames(self.latent_frames)

    def with_latent_frames(self, latent_frames: int) -> Clip:
        """The same clip at another length (audio scaled with it)."""
        audio = math.ceil(self.audio_tokens * latent_frames / self.latent_frames) if self.audio_tokens else 0
        return dataclasses.replace(self, latent_frames=latent_frames, audio_tokens=audio)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One worker's predicted peak, in bytes, with its parts (``note``: what it was planned for)."""

    parts: dict
    note: str = ""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {v / GIB:.3f}" for k, v in self.parts.items() if v) + " GiB"


def ffn_chunk_tokens(tokens: int, chunks: int | None) -> int:
    """Tokens in the largest FFN chunk; ``chunks`` None = the FFN Chunker's auto."""
    n = auto_ffn_chunks(tokens, 0, None) if chunks is None else max(1, chunks)
    return math.ceil(tokens / max(1, min(n, tokens or 1)))


def auto_ffn_chunks(tokens: int, ffn_bytes_per_token: int, free_bytes: float | None) -> int:
    """The FFN Chunker's ``auto``: fewest chunks with at most FFN_MAX_TOKENS_PER_CHUNK tokens each and
    a chunk's activations within FFN_FREE_MEMORY_SHARE of ``free_bytes`` (None: no memory limit)."""
    n = math.ceil(tokens / FFN_MAX_TOKENS_PER_CHUNK)
    if free_bytes is not None and free_bytes > 0 and ffn_bytes_per_token:
        n = max(n, math.ceil(tokens * ffn_bytes_per_token / (free_bytes * FFN_FREE_MEMORY_SHARE)))
    return max(1, min(FFN_MAX_CHUNKS, n))


def exchange_in_place(world: int, ring: int, tokens: int) -> bool:
    """Whether a group's Ulysses exchange goes in q's, k's and v's own buffers with the lean attention
    (``sequence_parallel.ulysses.swap_head_blocks``): Ulysses alone over a power of two of ranks above one,
    and ``tokens`` that divide it (no padding)."""
    return ring == 1 and world > 1 and world & (world - 1) == 0 and tokens % world == 0


def attention_vectors(dims: ModelDims, world: int, ring: int, lean: bool, lean_value: bool = False,
                      in_place: bool = False) -> float:
    """Hidden vectors per local video token at the attention phase's peak (``in_place``: the lean attention's
    Ulysses exchange has no send buffer, ``exchange_in_place``)."""
    c = dims.planner
    if lean:
        return (c.lean_attention - (c.lean_value if lean_value else 0) + (c.lean_gated if dims.gated_attention else 0)
                + (c.lean_exchange if world > 1 and not in_place else 0) + (c.ring if ring > 1 else 0))
    return c.attention + (c.ring if ring > 1 else 0) - (c.attention_out_in_place if world > 1 else 0)


def estimate(dims: ModelDims, clip: Clip, world: int = 1, ring: int = 1, ffn_chunks: int | None = None,
             per_token_timesteps: bool = False, sampler: bool = False, batch: int = 1,
             streaming: bool = False, lean: bool = False, lean_value: bool = False, nccl_peers: int = 0,
             in_place: bool | None = None) -> Estimate:
    """Peak memory of one of ``world`` workers (Ulysses x ``ring``) running one forward of ``clip``;
    ``ffn_chunks`` None = auto, 1 = no chunking; ``sampler`` adds the sampler's latent-sized state;
    ``streaming``: ComfyUI streams the weights (DynamicVRAM), only two blocks of them and their casts stay;
    ``lean``: the lean attention (``lean_attention``) instead of ComfyUI's own memory layout, ``lean_value``
    with self-attention's value written into its input's buffer, ``in_place`` with its Ulysses exchange in
    q's, k's and v's own buffers (None: where ``exchange_in_place`` says it runs);
    ``nccl_peers``: ranks this worker exchanges with over NCCL (their buffers, ``NCCL_PEER_BYTES`` each)."""
    n = clip.video_tokens
    local = math.ceil(n / world)
    vec = dims.vector
    c = dims.planner
    if in_place is None:
        in_place = lean and exchange_in_place(world, ring, n)
    attn = attention_vectors(dims, world, ring, lean, lean_value, in_place)
    if per_token_timesteps:
        attn += c.per_token_timestep
    audio_vec = dims.audio_dim * dims.compute_bytes
    attention = local * attn * vec + n * c.full_sequence * vec
    ffn = local * c.ffn_kept * vec + ffn_chunk_tokens(local, ffn_chunks) * dims.ffn_bytes_per_token
    parts = {
        "weights": dims.streamed_weight_bytes if streaming else dims.weight_bytes,
        "weight casts": dims.streamed_cast_bytes if streaming else dims.cast_bytes,
        "fixed": c.fixed_bytes + (int(c.lean_range * min(local, LEAN_RANGE_TOKENS) * vec) if lean else 0),
        "allocator pool": int(c.lean_pool * local * vec) if lean else 0,
        "exchange buffers": nccl_peers * NCCL_PEER_BYTES + (2 * min(SWAP_STAGING_BYTES, local * vec // world)
                                                            if in_place else 0),
        "video tokens": int(batch * max(attention, ffn)),
        "audio tokens": int(batch * clip.audio_tokens * c.attention * audio_vec),
    }
    if sampler:  # float32 copies of the packed latent, whole on every rank
        copies = LEAN_SAMPLER_COPIES if lean else SAMPLER_COPIES
        parts["sampler state"] = copies * 4 * clip.geometry.latent_elements(clip)
    return Estimate(parts)


def largest_latent_frames(budget: int, dims: ModelDims, clip: Clip, **kwargs) -> int:
    """The most latent frames of ``clip``'s size whose estimate fits ``budget`` (0 if none)."""
    lo, hi = 0, 1
    while estimate(dims, clip.with_latent_frames(hi), **kwargs).total <= budget and hi < 1 << 20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate(dims, clip.with_latent_frames(mid), **kwargs).total <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def smallest_world(budget: int, dims: ModelDims, clip: Clip, max_world: int, video_heads: int, **kwargs) -> int | None:
    """Fewest workers (all-Ulysses, dividing the heads) whose estimate fits ``budget``, up to ``max_world``
    (with NCCL, ``nccl_peers`` > 0, each count has its own peers)."""
    nccl = kwargs.pop("nccl_peers", 0) > 0
    for w in range(1, max_world + 1):
        if video_heads % w == 0 and estimate(dims, clip, world=w, nccl_peers=w - 1 if nccl else 0,
                                             **kwargs).total <= budget:
            return w
    return None
