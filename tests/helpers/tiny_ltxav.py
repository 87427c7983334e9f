"""The tiny LTXAV checkpoints the tests use: the writer and configs are tools/tiny_models.py's (the demo
makes the same models); whole checkpoints with VAEs, the latent upsampler, the LoRA writer and a non-LTX
model are the tests' own."""
import json

import torch
from safetensors.torch import save_file

from .comfy_host import tools_module

_tiny = tools_module("tiny_models")
LTX23_OPTIONS, TINY_CONFIG, VERSIONS = _tiny.LTX23_OPTIONS, _tiny.TINY_CONFIG, _tiny.VERSIONS
context_width, write_tiny_ltxav = _tiny.context_width, _tiny.write_tiny_ltxav
_diffusion_model_state = _tiny.diffusion_model_state


# A tiny video VAE of the LTX-2 layout (32x spatial, 8x temporal, 128 latent channels), as the real
# checkpoints' metadata ``config.vae`` describes theirs, with few channels and layers.
TINY_VAE = {
    "_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128,
    "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_space_res", {"multiplier": 2}],
                       ["compress_time_res", {"multiplier": 2}], ["compress_all_res", {"multiplier": 2}],
                       ["compress_all_res", {"multiplier": 2}]],
    "decoder_blocks": [["res_x", {"num_layers": 1, "inject_noise": False}],
                       ["compress_all", {"residual": True, "multiplier": 2}],
                       ["compress_all", {"residual": True, "multiplier": 2}],
                       ["compress_all", {"residual": True, "multiplier": 2}],
                       ["res_x", {"num_layers": 1, "inject_noise": False}]],  # first in the decoder: ComfyUI detects it
    "encoder_base_channels": 8, "decoder_base_channels": 8, "scaling_factor": 1.0, "norm_layer": "pixel_norm",
    "patch_size": 4, "latent_log_var": "uniform", "use_quant_conv": False, "causal_decoder": False,
    "timestep_conditioning": False,
}
# The audio VAE (mel spectrogram -> [B, 8, T, 16] latents) and its vocoder, as ``config.audio_vae`` and
# ``config.vocoder`` describe them, with few channels.
TINY_AUDIO_VAE = {
    "model": {"params": {"sampling_rate": 16000, "ddconfig": {
        "double_z": True, "mel_bins": 64, "z_channels": 8, "resolution": 256, "downsample_time": False,
        "in_channels": 2, "out_ch": 2, "ch": 8, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0, "mid_block_add_attention": False, "norm_type": "pixel", "causality_axis": "height"}}},
    "preprocessing": {"stft": {"filter_length": 1024, "hop_length": 160}},
}
TINY_VOCODER = {"resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]], "upsample_rates": [5, 4, 2, 2, 2],
                "upsample_kernel_sizes": [10, 8, 4, 4, 4], "upsample_initial_channel": 32, "stereo": True,
                "activation": "snake", "resblock": "1"}
# The latent upsampler (x2 spatial), as its file's metadata ``config`` describes it.
TINY_UPSCALER = {"_class_name": "LatentUpsampler", "in_channels": 128, "mid_channels": 32, "num_blocks_per_stage": 1,
                 "dims": 3, "spatial_upsample": True, "temporal_upsample": False, "spatial_scale": 2.0,
                 "rational_resampler": False}


def _random_state(module, gen):
    """Random weights for a module built without initialisation: fan-in scaled matrices and kernels,
    unit scales, zero biases; per-channel statistics mean 0, std 1."""
    sd = {}
    for name, t in module.state_dict().items():
        if name.endswith("std-of-means"):
            sd[name] = torch.ones(t.shape)
        elif name.endswith("mean-of-means") or t.dim() < 1:
            sd[name] = torch.zeros(t.shape)
        elif t.dim() >= 2:
            sd[name] = torch.randn(t.shape, generator=gen) / (t[0].numel() ** 0.5)
        elif name.endswith("weight") or "alpha" in name or "beta" in name:
            sd[name] = torch.ones(t.shape)
        else:
            sd[name] = torch.zeros(t.shape)
    return {k: v.contiguous() for k, v in sd.items()}


def write_tiny_checkpoint(path, version="2.3", num_layers=2, seed=0, std=0.2):
    """A whole LTX-2 checkpoint as Load Checkpoint and LTXV Audio VAE Loader read one: the diffusion
    model (``model.diffusion_model.``), the video VAE (``vae.``), the audio VAE (``audio_vae.``) and its
    vocoder (``vocoder.``), each with its config in the metadata, all tiny. Returns the metadata config."""
    from comfy.ldm.lightricks.vae.audio_vae import AudioVAE
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    config = {"transformer": {**TINY_CONFIG, **VERSIONS[version]}, "vae": TINY_VAE, "audio_vae": TINY_AUDIO_VAE,
              "vocoder": TINY_VOCODER}
    gen = torch.Generator().manual_seed(seed + 1)
    sd = {f"model.diffusion_model.{k}": v
          for k, v in _diffusion_model_state(config["transformer"], num_layers, seed, std).items()}
    sd |= {f"vae.{k}": v for k, v in _random_state(VideoVAE(config=TINY_VAE), gen).items()}
    audio = AudioVAE(metadata={"config": config})
    sd |= {f"audio_vae.{k}": v for k, v in _random_state(audio.autoencoder, gen).items()}
    sd |= {f"vocoder.{k}": v for k, v in _random_state(audio.vocoder, gen).items()}
    save_file(sd, str(path), metadata={"config": json.dumps(config)})
    return config


def write_tiny_upscaler(path, seed=0):
    """A latent upsampler file as Load Latent Upscale Model reads one (config in its metadata)."""
    from comfy.ldm.lightricks.latent_upsampler import LatentUpsampler

    sd = _random_state(LatentUpsampler.from_config(TINY_UPSCALER), torch.Generator().manual_seed(seed))
    save_file(sd, str(path), metadata={"config": json.dumps(TINY_UPSCALER)})


def write_lora(ckpt_path, keys, path, rank=4, scale=0.3, seed=7):
    """A LoRA (lora_up / lora_down, ComfyUI's generic key format) on ``keys`` of the diffusion model in
    the checkpoint (a diffusion-model file or a whole checkpoint)."""
    from safetensors.torch import load_file

    sd = load_file(str(ckpt_path))
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for key in keys:
        weight = sd.get(f"{key}.weight", sd.get(f"model.diffusion_model.{key}.weight"))  # a whole checkpoint's too
        out_dim, in_dim = weight.shape
        lora[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * scale
        lora[f"diffusion_model.{key}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) * scale
    save_file(lora, str(path))


def non_ltx_patcher():
    """A ModelPatcher whose diffusion model is not LTX (a Linear), for the refusal tests."""
    import comfy.model_patcher

    class NotLTX(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(2, 2)

    return comfy.model_patcher.ModelPatcher(NotLTX(), torch.device("cpu"), torch.device("cpu"))
