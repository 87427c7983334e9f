"""Peak device memory of one LTXAV worker, predicted before sampling starts.

A worker holds the model (weights are not sharded; with ComfyUI's DynamicVRAM only the blocks in use
stay on the GPU) and, through every block, its share of the video tokens (``xdit_context_parallel``);
audio stays whole on every rank. Its peak is

    weights + cast buffer + fixed + max(attention phase, FFN phase) [+ sampler state]

with per-token costs counted in *hidden vectors* (one token's ``video_dim`` activations in the
compute dtype; 8 KB for LTX-2 in bf16). The coefficients were measured with
``bench/sequence_parallel.py`` (H200, bf16, ComfyUI 0.20.1: stock forward, Ulysses and ring degrees,
three sizes; ``bench/results/2026-11-28-h200x*-sequence_parallel.jsonl``) and checked against the
fp8, 48-layer, 24 GB runs of ``bench/long_video.py``:

* attention phase: 8.5 vectors per local video token on one GPU (x, its norm, v, the normed q and k,
  RoPE's output and temporary, the RoPE tables, the attention output); 8.0 with W > 1 (the output
  goes into a q/k/v buffer, so the peak moves to RoPE), +1.0 with a ring degree (xfuser's float32
  accumulators), and 0.06 per token of the *whole* sequence (fitted; it was a head group's gathered
  q/k/v, which q/k/v's own buffers now receive, and the measured peaks did not change);
* FFN phase: 3.5 vectors per local token kept, plus one FFN chunk's two 4x-wide tensors;
* per-token timesteps (image-to-video, guides): 0.5 more (the per-token adaLN values);
* fp8 (or any cast) weights: one block linear cast to the compute dtype at a time; GGUF weights count
  as stored (quantized), their casts by their elements, with ComfyUI-GGUF's float16 dequantization;
* audio tokens cost the same number of vectors of ``audio_dim``;
* weights: all of them, unless ComfyUI streams them (DynamicVRAM, its default on NVIDIA): then only
  what is on the GPU at the peak, the block running and the next one arriving, as stored; the parts
  outside the blocks (connectors, adaLN, patchify, output) stream too and run before and after the
  blocks, not at the peak. Measured in ComfyUI's process on one H100 (48 layers, 2026-12-06):
  DynamicVRAM held 0.85 GiB (fp8) and 1.57 GiB (bf16) after the longest clips, two blocks plus 0.13.
  Weights stored in another dtype than the compute dtype (fp8) add ComfyUI's casts in PyTorch's pool:
  PyTorch's peak was 2.66 GiB above bf16's for the same clip at three lengths and both card sizes,
  3.7 blocks' linears in bf16, counted as STREAMED_CAST_BLOCKS.

The FFN Chunker's ``auto`` and the parallel sampler's refusal both use this module.
"""
from __future__ import annotations

import dataclasses
import math

GIB = 1 << 30
# hidden vectors per local video token (see the module docstring)
ATTENTION_VECTORS = 8.5
ATTENTION_OUT_IN_PLACE_VECTORS = 0.5  # sequence parallel: the attention output goes into a q/k/v buffer
RING_VECTORS = 1.0
FULL_SEQUENCE_VECTORS = 0.06
FFN_KEPT_VECTORS = 3.5
PER_TOKEN_TIMESTEP_VECTORS = 0.5
FIXED_BYTES = int(0.055 * GIB)  # context, connector, kernels' workspaces
# a process's CUDA context (measured 0.52 GiB, torch 2.11, H100 and H200): outside PyTorch's allocator, so a
# card's free memory already leaves it out, but an emulated card's share (LTXAV_PARALLEL_MEMORY_CAP_GIB) holds it
CUDA_CONTEXT_BYTES = int(0.52 * GIB)
# NCCL's buffers for an all-to-all, per peer: not measured here (no machine with several GPUs); NVIDIA/nccl#1685
# reports 3.28 GB more on each of 8 H100s after the first all_to_all_single (32 channels a pair), 0.47 GiB a peer
NCCL_PEER_BYTES = int(0.47 * GIB)
# the lean attention (lean_attention.py): no rotary tables; norms, rotation, attention output and the square
# output projections in place. Measured in ComfyUI's process on one H100 (8 layers fp8, 24 GiB emulated,
# 2026-12-06, bench/results/2026-12-06-h100-comfy_long_video-lean-*): at 8,301 frames 768x512 it ran out of
# memory making video self-attention's v, with x, its norm, q and k alive (the allocator's live blocks), so
# the attention phase holds x, its norm, q, k and v of the local tokens ...
LEAN_ATTENTION_VECTORS = 5.0
# ... and with gated attention (LTX-2.3) the gated output, a new tensor ComfyUI makes (not measured) ...
LEAN_GATED_VECTORS = 1.0
# ... and over several ranks Ulysses' send buffer and the other ranks' blocks' output and its reshaped copy
# (not measured: no run of several workers with the lean attention yet) ...
LEAN_EXCHANGE_VECTORS = 1.5
# ... and one range's temporaries (a query range's output and its reshaped copy; the rotary rows and
# rotation of a range are smaller): two hidden vectors of up to LEAN_RANGE_TOKENS local tokens
LEAN_RANGE_VECTORS = 2.0
LEAN_RANGE_TOKENS = 16384  # lean_attention.QUERY_CHUNK_TOKENS
# ComfyUI's sampler keeps nine float32 copies of the packed latent through the forward (calc_cond_batch's
# input and its parts, the noise, the latent and the step's x: the live blocks at 8,301 frames)
LEAN_SAMPLER_COPIES = 9
# the allocator's pool beyond PyTorch's peak: with the lean attention a clip's largest tensors are whole
# hidden states, and the pool must find room for one more while the others are live. 7,401 frames ran and
# 7,801 ran out of memory making v (PyTorch's peak 19.18 GiB and >= 19.88 GiB, 23.41 GiB free, comfy-aimdo
# 0.85): the plans leave 2.66 and 1.76 GiB, 0.98 and 0.62 of a hidden vector; counted as 0.75 of one.
# Planned only with the lean attention, whose longest clips lie far beyond stock's, so it refuses nothing
# stock runs
LEAN_POOL_VECTORS = 0.75
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
class ModelDims:
    """What the plan needs of a model."""

    video_dim: int = 4096
    audio_dim: int = 2048
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

    @classmethod
    def of(cls, diffusion_model, compute_dtype=None) -> ModelDims:
        """From an ``LTXAVModel`` (ComfyUI's ``diffusion_model``); ``compute_dtype``: the dtype it
        runs in (ComfyUI's ``get_dtype_inference()``), default its weights' dtype. Weights count as
        stored (a GGUF weight's quantized blocks); casts by their elements (a GGUF weight's logical
        shape), see ``cast_bytes``."""
        import torch

        params = list(diffusion_model.parameters()) + list(diffusion_model.buffers())
        weight_bytes = sum(p.numel() * p.element_size() for p in params)
        blocks = getattr(diffusion_model, "transformer_blocks", diffusion_model)
        linears = [m.weight for m in blocks.modules() if isinstance(m, torch.nn.Linear)]
        compute_dtype = compute_dtype or (linears[0].dtype if linears else torch.float32)
        compute_bytes = torch.empty((), dtype=compute_dtype).element_size()
        cast = max((cast_bytes(w, compute_dtype, compute_bytes) for w in linears), default=0)
        audio_dim = getattr(diffusion_model, "audio_inner_dim", 0) or 0
        block_list = list(getattr(diffusion_model, "transformer_blocks", []))
        block_sizes = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in block_list]
        block_casts = [sum(cast_bytes(m.weight, compute_dtype, compute_bytes) for m in b.modules()
                           if isinstance(m, torch.nn.Linear)) for b in block_list]
        gated = any(getattr(getattr(b, "attn1", None), "to_gate_logits", None) is not None for b in block_list)
        return cls(video_dim=diffusion_model.inner_dim, audio_dim=audio_dim, weight_bytes=weight_bytes,
                   cast_bytes=cast, compute_bytes=compute_bytes, block_bytes=max(block_sizes, default=0),
                   blocks_bytes=sum(block_sizes), block_cast_bytes=max(block_casts, default=0), gated_attention=gated)

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


@dataclasses.dataclass(frozen=True)
class Clip:
    """The latent being sampled: video [frames, height, width] in latent cells, audio length."""

    latent_frames: int
    latent_height: int
    latent_width: int
    audio_tokens: int = 0

    @classmethod
    def from_pixels(cls, frames: int, width: int, height: int, fps: float = 25.0, audio: bool = True) -> Clip:
        """LTX-2's VAE: 8x time (plus the first frame), 32x space; audio ~25 latents a second."""
        return cls((frames - 1) // 8 + 1, height // 32, width // 32,
                   math.ceil(round(frames * 25 / fps, 6)) if audio else 0)

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.latent_height * self.latent_width

    @property
    def frames(self) -> int:
        return (self.latent_frames - 1) * 8 + 1

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


def attention_vectors(dims: ModelDims, world: int, ring: int, lean: bool) -> float:
    """Hidden vectors per local video token at the attention phase's peak."""
    if lean:
        return (LEAN_ATTENTION_VECTORS + (LEAN_GATED_VECTORS if dims.gated_attention else 0)
                + (LEAN_EXCHANGE_VECTORS if world > 1 else 0) + (RING_VECTORS if ring > 1 else 0))
    return ATTENTION_VECTORS + (RING_VECTORS if ring > 1 else 0) - (ATTENTION_OUT_IN_PLACE_VECTORS if world > 1 else 0)


def estimate(dims: ModelDims, clip: Clip, world: int = 1, ring: int = 1, ffn_chunks: int | None = None,
             per_token_timesteps: bool = False, sampler: bool = False, batch: int = 1,
             streaming: bool = False, lean: bool = False, nccl_peers: int = 0) -> Estimate:
    """Peak memory of one of ``world`` workers (Ulysses x ``ring``) running one forward of ``clip``;
    ``ffn_chunks`` None = auto, 1 = no chunking; ``sampler`` adds the sampler's latent-sized state;
    ``streaming``: ComfyUI streams the weights (DynamicVRAM), only two blocks of them and their casts stay;
    ``lean``: the lean attention (``lean_attention``) instead of ComfyUI's own memory layout;
    ``nccl_peers``: ranks this worker exchanges with over NCCL (their buffers, ``NCCL_PEER_BYTES`` each)."""
    n = clip.video_tokens
    local = math.ceil(n / world)
    vec = dims.vector
    attn = attention_vectors(dims, world, ring, lean)
    if per_token_timesteps:
        attn += PER_TOKEN_TIMESTEP_VECTORS
    audio_vec = dims.audio_dim * dims.compute_bytes
    attention = local * attn * vec + n * FULL_SEQUENCE_VECTORS * vec
    ffn = local * FFN_KEPT_VECTORS * vec + ffn_chunk_tokens(local, ffn_chunks) * dims.ffn_bytes_per_token
    parts = {
        "weights": dims.streamed_weight_bytes if streaming else dims.weight_bytes,
        "weight casts": dims.streamed_cast_bytes if streaming else dims.cast_bytes,
        "fixed": FIXED_BYTES + (int(LEAN_RANGE_VECTORS * min(local, LEAN_RANGE_TOKENS) * vec) if lean else 0),
        "allocator pool": int(LEAN_POOL_VECTORS * local * vec) if lean else 0,
        "exchange buffers": nccl_peers * NCCL_PEER_BYTES,
        "video tokens": int(batch * max(attention, ffn)),
        "audio tokens": int(batch * clip.audio_tokens * ATTENTION_VECTORS * audio_vec),
    }
    if sampler:  # noise, latent, denoised and the step's x in float32, whole on every rank
        parts["sampler state"] = (LEAN_SAMPLER_COPIES if lean else 4) * 4 * (n * 128 + clip.audio_tokens * 128)
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
