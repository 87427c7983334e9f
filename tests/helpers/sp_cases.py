"""Inputs and runs shared by the stock (single process) and sequence-parallel (one process per
rank) sides of the sequence-parallel tests. Everything is seeded, so both sides build the same
inputs; run_case returns the outputs as a list of tensors."""
import contextlib
import importlib
import sys
import types

import torch

from .comfy_host import make_conditioning, make_latent
from .tiny_ltxav import context_width

# latent sizes (width, height, frames): 96 tokens (4 frames x 4 x 6), divisible by 2, 3 and 4;
# 45 tokens (3 x 3 x 5) and 70 tokens (2 x 5 x 7) for counts that do not divide.
SHAPES = {"even": (192, 128, 25), "odd45": (160, 96, 17), "odd70": (224, 160, 9)}
FORWARD_CASES = ["fwd_t2v", "fwd_noaudio", "fwd_i2v", "fwd_ref_audio"]
SAMPLER_CASES = ["ks_t2v", "ks_i2v", "ks_guide", "ks_guide_attenuated", "ks_noaudio"]
VIDEO_SIDE_ADALN = ("adaln_single", "av_ca_video_scale_shift_adaln_single", "av_ca_a2v_gate_adaln_single")


class FakeVAE:
    """Stands in for the LTX-2 video VAE in LTXVAddGuide (only its encode output shape matters)."""
    downscale_index_formula = (8, 32, 32)

    def encode(self, pixels):
        n, h, w, _ = pixels.shape
        g = torch.Generator().manual_seed(int(n * 1000 + h + w))
        return torch.randn(1, 128, (n - 1) // 8 + 1, h // 32, w // 32, generator=g)


def token_count(shape):
    w, h, f = SHAPES[shape]
    return ((f - 1) // 8 + 1) * (h // 32) * (w // 32)


def forward_inputs(dm, shape, case, seed=0):
    w, h, frames = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    fl, lh, lw = (frames - 1) // 8 + 1, h // 32, w // 32
    vx = torch.randn(1, 128, fl, lh, lw, generator=g)
    ax = torch.randn(1, 8, frames + 1, 16, generator=g)
    ctx = torch.randn(1, 16, processed_context_width(dm), generator=g)
    sigma = torch.full((1,), 0.7)
    kw = {"x": [vx] if case == "fwd_noaudio" else [vx, ax], "timestep": (sigma, sigma), "context": ctx,
          "frame_rate": 25}
    if case == "fwd_i2v":  # as comfy.model_base.LTXAV.process_timestep does for a denoise mask
        mask = torch.ones(1, 1, fl, lh, lw)
        mask[:, :, 0] = 0
        kw["denoise_mask"] = mask
        kw["timestep"] = (dm.patchifier.patchify((mask * sigma.view(1, 1, 1, 1, 1))[:, :1])[0], sigma)
    if case == "fwd_ref_audio":
        kw["ref_audio"] = {"tokens": torch.randn(1, 5, 128, generator=g)}
    return to_dtype(kw, dm.dtype)


def processed_context_width(dm):
    """Width of the context the diffusion model's forward takes (after the text connectors): LTX-2's
    is twice caption_channels, LTX-2.3's the video and audio streams' widths side by side."""
    if dm.caption_proj_before_connector:
        return dm.cross_attention_dim + dm.audio_cross_attention_dim
    return 2 * dm.caption_channels


def to_dtype(obj, dtype):
    """Floating tensors in ``obj`` (nested lists, tuples, dicts) cast to ``dtype`` (the float64 reference
    model's forward takes float64 inputs, as ComfyUI's BaseModel casts them)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_dtype(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: to_dtype(v, dtype) for k, v in obj.items()}
    return obj


def sampler_inputs(shape, case, width):
    from comfy_extras.nodes_lt import LTXVAddGuide, LTXVConcatAVLatent

    w, h, frames = SHAPES[shape]
    pos, neg = make_conditioning(width, seed=1), make_conditioning(width, seed=2)
    video = make_latent(w, h, frames, audio=False)
    if case == "ks_i2v":  # what LTXVImgToVideoInplace leaves: first latent frame kept (mask 0)
        mask = torch.ones(1, 1, video["samples"].shape[2], 1, 1)
        mask[:, :, 0] = 0.0
        video["noise_mask"] = mask
    if case in ("ks_guide", "ks_guide_attenuated"):
        image = torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(3))
        strength = 1.0 if case == "ks_guide" else 0.5
        pos, neg, video = LTXVAddGuide.execute(pos, neg, FakeVAE(), video, image, 0, strength)
    if case == "ks_noaudio":
        return pos, neg, video
    audio = {"samples": torch.zeros(1, 8, frames + 1, 16), "type": "audio"}
    return pos, neg, LTXVConcatAVLatent.execute(video, audio)[0]


def stock_patchers(comfy, tiny_ckpts) -> dict:
    """Each tiny checkpoint (by version) loaded by ComfyUI in float32 and float64: (version, dtype) -> patcher."""
    load = comfy.sd.load_diffusion_model
    return {(v, dtype): load(str(path), model_options={"dtype": dtype})
            for v, (path, _) in tiny_ckpts.items() for dtype in (torch.float32, torch.float64)}


def run_case(patcher, case, shape, transformer_options):
    """Outputs of one case through ``patcher`` (direct diffusion-model forward, or 2 KSampler steps)."""
    import nodes

    dm = patcher.model.diffusion_model
    if case in FORWARD_CASES:
        with torch.no_grad():
            out = dm(**forward_inputs(dm, shape, case), transformer_options=transformer_options)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    pos, neg, latent = sampler_inputs(shape, case, context_width(vars(dm)))
    out = nodes.common_ksampler(patcher, 42, 2, 3.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    return list(out.unbind()) if getattr(out, "is_nested", False) else [out]


@contextlib.contextmanager
def recording_shapes(dm):
    """Record the token counts ComfyUI's PE code and video-side adaLN modules are asked for:
    {"pe": [tokens per _precompute_freqs_cis call], "adaln": [values per adaLN call]}."""
    seen = {"pe": [], "adaln": []}
    real = dm._precompute_freqs_cis

    def pe(indices_grid, *args, **kwargs):
        seen["pe"].append(indices_grid.shape[2])
        return real(indices_grid, *args, **kwargs)

    hooks = [getattr(dm, name).register_forward_pre_hook(lambda mod, args: seen["adaln"].append(args[0].numel()))
             for name in VIDEO_SIDE_ADALN]
    dm._precompute_freqs_cis = pe
    try:
        yield seen
    finally:
        del dm._precompute_freqs_cis
        for hk in hooks:
            hk.remove()


# Broken forwards for the twins of the equality tests (run in the ranks through run_parallel's sp_attrs)

def shifted_tiles(sp_mod, rank):
    """Every rank's output tile rolled by one token before the gather: a layout off by one."""
    real = sp_mod.ShardLayout.gather

    def gather(self, t, group, dim=1):
        return real(self, t.roll(1, dims=dim), group, dim)

    sp_mod.ShardLayout.gather = gather


def scaled_attention(sp_mod, rank):
    """Rank 1's attention outputs off by 2^-10 in scale: a wrong softmax scale or merge weight."""
    real = sp_mod.ShardedForward.kernel_call

    def kernel_call(self, *args):
        out = real(self, *args)
        return out * (1 + 2 ** -10) if rank == 1 else out

    sp_mod.ShardedForward.kernel_call = kernel_call


def exchanges_logged(sp_mod, rank):
    """Each Ulysses exchange logs which way it went and for how many tokens a rank: in q's, k's and v's own
    buffers (``ulysses_in_place``) or through a send buffer (``heads_from_sequence_shards``, per tensor)."""
    import logging

    ulysses = sys.modules[sp_mod.ulysses_attention.__module__]
    log = logging.getLogger(sp_mod.__name__)
    in_place, with_buffer = ulysses.ulysses_in_place, ulysses.heads_from_sequence_shards

    def logged_in_place(kernel, q, k, v, pg):
        log.info("exchange in place: %d tokens a rank", q.shape[1])
        return in_place(kernel, q, k, v, pg)

    def logged_with_buffer(t, groups, pg, reuse=True):
        log.info("exchange with a send buffer: %d tokens a rank", t.shape[1])
        return with_buffer(t, groups, pg, reuse)

    ulysses.ulysses_in_place, ulysses.heads_from_sequence_shards = logged_in_place, logged_with_buffer


def swap_one_token_off(sp_mod, rank):
    """The in-place exchange's swapped blocks (the other ranks' tokens) one token off after every swap."""
    ulysses = sys.modules[sp_mod.ulysses_attention.__module__]
    real = ulysses.swap_head_blocks

    def off(t, pg):
        real(t, pg)
        me = ulysses.dist.get_rank(pg)
        for peer in range(t.shape[1]):
            if peer != me:
                t[:, peer] = t[:, peer].roll(1, 0)

    ulysses.swap_head_blocks = off


def no_exchange(sp_mod, rank):
    """Every exchange path of self-attention, and the output's all-gather, raises: a group of one must
    run ComfyUI's own call (the exchanges' send buffers are a hidden state's worth of memory more than
    stock's) and gather nothing (NCCL would set up a communicator, and its buffers, when the card is
    fullest)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"rank {rank}: a sequence-parallel exchange ran")

    for name in ("ulysses_attention", "ring_attention", "sharded_keys_attention"):
        setattr(sp_mod, name, refuse)
    sp_mod.ShardedForward.gathered_attention = refuse
    sys.modules[sp_mod.ShardLayout.__module__].dist = types.SimpleNamespace(all_gather=refuse)


def small_lean_ranges(sp_mod, rank):
    """The lean attention's ranges shrunk to a few tokens (the tiny clips have 96), so a rank's rotary
    tables, attention calls, norms and projections all go by ranges."""
    from helpers.lean_ranges import shrink

    lean = sp_mod.lean_attention
    shrink(lean, importlib.import_module(lean.__name__.rsplit(".", 1)[0] + ".models.ltx_rope"))
