"""Tiny LTX-2 and LTX-2.3 checkpoints and their inputs, for the demo (tools/demo.py) and the tests: real
ComfyUI key names, random weights, config in metadata; a conditioning and an audio-video latent as
ComfyUI's nodes pass them on, without the Gemma text encoder.

The checkpoint is written from ComfyUI's own ``LTXAVModel`` (so every key name is the real one) and
carries its config as safetensors metadata ``config = {"transformer": {...}}``, which
``comfy.model_detection`` reads; ``comfy.sd.load_diffusion_model`` then detects it as LTXAV.
Needs the ComfyUI host on ``sys.path``.
"""
import json

import torch
from safetensors.torch import save_file

# 12 heads: divisible by every Ulysses degree the tests use (1, 2, 3, 4). The keys are those of the
# real checkpoints' metadata (ltx-2-19b-dev.safetensors, ltx-2.3-22b-dev.safetensors: config.transformer);
# sizes are tiny, options and position settings as in the real files.
TINY_CONFIG = {
    "num_attention_heads": 12,
    "attention_head_dim": 8,
    "cross_attention_dim": 96,
    "audio_num_attention_heads": 12,
    "audio_attention_head_dim": 4,
    "audio_cross_attention_dim": 48,
    "caption_channels": 16,
    "connector_num_attention_heads": 2,
    "connector_attention_head_dim": 8,
    "connector_num_layers": 1,
    "rope_type": "split",
    "frequencies_precision": "float64",
    "use_middle_indices_grid": True,
    "causal_temporal_positioning": True,
    "timestep_scale_multiplier": 1000,
    "av_ca_timestep_scale_multiplier": 1000.0,
}

# LTX-2.3 (22B): what its metadata adds to LTX-2's. Gated attention in the blocks and connectors, the
# cross-attention adaLN (prompt_adaln_single, 9-row scale-shift tables), and the caption projection
# before the connectors (identity: caption_projection_first_linear false), so the raw text embedding
# is [video cross dim + audio cross dim] wide and each connector is as wide as its stream
# (real: 32 x 128 video, 32 x 64 audio).
LTX23_OPTIONS = {
    "apply_gated_attention": True,
    "cross_attention_adaln": True,
    "caption_proj_before_connector": True,
    "caption_projection_first_linear": False,
    "connector_apply_gated_attention": True,
    "connector_num_attention_heads": 12,
    "connector_attention_head_dim": 8,
    "audio_connector_num_attention_heads": 12,
    "audio_connector_attention_head_dim": 4,
}
VERSIONS = {"2": {}, "2.3": LTX23_OPTIONS}


def context_width(config) -> int:
    """Width of the raw text embedding a CONDITIONING carries for this model (without Gemma): LTX-2's
    connectors take caption_channels; LTX-2.3's take the video and audio parts side by side."""
    if config.get("caption_proj_before_connector"):
        return config["cross_attention_dim"] + config["audio_cross_attention_dim"]
    return config["caption_channels"]


def write_tiny_ltxav(path, num_layers=2, seed=0, std=0.2, version="2", **overrides):
    """Write a random-weight LTXAV diffusion-model checkpoint (``version`` "2" or "2.3") to ``path``;
    return its config."""
    config = {**TINY_CONFIG, **VERSIONS[version], **overrides}
    save_file(diffusion_model_state(config, num_layers, seed, std), str(path),
              metadata={"config": json.dumps({"transformer": config})})
    return config


def diffusion_model_state(config, num_layers, seed, std) -> dict:
    """Random weights under the real key names of ComfyUI's ``LTXAVModel`` built from ``config``."""
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel

    model = LTXAVModel(num_layers=num_layers, dtype=torch.float32, device="cpu",
                       operations=comfy.ops.disable_weight_init, **config)
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(tensor.shape, generator=gen) * std).contiguous()
            for name, tensor in model.state_dict().items()}


def make_conditioning(caption_channels: int, tokens: int = 8, seed: int = 0):
    """A CONDITIONING as LTXVConditioning would pass it on, without the Gemma text encoder."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, caption_channels, generator=g),
             {"pooled_output": None, "unprocessed_ltxav_embeds": True, "frame_rate": 25.0}]]


def make_latent(width=64, height=64, length=17, audio=True):
    """An LTXAV LATENT from the stock nodes (video via EmptyLTXVLatentVideo, audio zeros of LTX-2's
    shape [B, 8, T, 16] with T = ceil(length / fps * 25), joined by LTXVConcatAVLatent)."""
    from comfy_extras.nodes_lt import EmptyLTXVLatentVideo, LTXVConcatAVLatent

    video = EmptyLTXVLatentVideo.execute(width, height, length, 1)[0]
    if not audio:
        return video
    a = {"samples": torch.zeros(1, 8, length + 1, 16), "type": "audio"}
    return LTXVConcatAVLatent.execute(video, a)[0]
