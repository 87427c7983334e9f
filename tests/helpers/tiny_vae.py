"""A tiny LTX-2 / LTX-2.3 checkpoint with its video VAE and audio VAE, as ComfyUI's loaders read them:
``CheckpointLoaderSimple`` (model + video VAE, keys ``model.diffusion_model.*`` and ``vae.*``) and
``LTXVAudioVAELoader`` (keys ``audio_vae.*`` and ``vocoder.*``), configs in the safetensors metadata
``config`` = {"transformer", "vae", "audio_vae", "vocoder"} as in the real files.

The VAEs are ComfyUI's own classes at tiny widths with the real layouts: LTX-2's video decoder (three
residual 2x2x2 upsamplers) or LTX-2.3's (space, time, then two 2x2x2), 8x temporal and 32x spatial
compression, 128 latent channels; LTX-2's vocoder (24 kHz) or LTX-2.3's with bandwidth extension
(48 kHz). Random weights scaled so the decoded frames stay mostly inside [0, 1].
"""
import json

import torch
from safetensors.torch import load_file, save_file

from .tiny_ltxav import write_tiny_ltxav

ENCODER_BLOCKS = [["res_x", {"num_layers": 1}], ["compress_space_res", {"multiplier": 2}],
                  ["compress_time_res", {"multiplier": 2}], ["compress_all_res", {"multiplier": 2}],
                  ["compress_all_res", {"multiplier": 1}], ["res_x", {"num_layers": 1}]]
DECODER_BLOCKS = {
    # LTX-2 (diffusers' conversion: three residual spatiotemporal upsamplers, 5 resnets each level)
    "2": [["res_x", {"num_layers": 1, "inject_noise": False}], ["compress_all", {"residual": True, "multiplier": 2}],
          ["res_x", {"num_layers": 1, "inject_noise": False}], ["compress_all", {"residual": True, "multiplier": 2}],
          ["res_x", {"num_layers": 1, "inject_noise": False}], ["compress_all", {"residual": True, "multiplier": 2}],
          ["res_x", {"num_layers": 1, "inject_noise": False}]],
    # LTX-2.3 (its checkpoint's metadata)
    "2.3": [["res_x", {"num_layers": 1}], ["compress_space", {"multiplier": 2}], ["res_x", {"num_layers": 2}],
            ["compress_time", {"multiplier": 2}], ["res_x", {"num_layers": 1}], ["compress_all", {"multiplier": 1}],
            ["res_x", {"num_layers": 1}], ["compress_all", {"multiplier": 2}], ["res_x", {"num_layers": 1}]],
}


def video_vae_config(version="2") -> dict:
    config = {"_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3,
              "latent_channels": 128, "encoder_blocks": ENCODER_BLOCKS, "decoder_blocks": DECODER_BLOCKS[version],
              "scaling_factor": 1.0, "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": "uniform",
              "use_quant_conv": False, "causal_decoder": False, "timestep_conditioning": False,
              "encoder_base_channels": 8, "decoder_base_channels": 4}
    if version == "2.3":
        config["spatial_padding_mode"] = "zeros"
    return config


AUDIO_VAE_CONFIG = {
    "model": {"params": {"ddconfig": {"double_z": True, "mel_bins": 64, "z_channels": 8, "resolution": 256,
                                      "downsample_time": False, "in_channels": 2, "out_ch": 2, "ch": 8,
                                      "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [],
                                      "dropout": 0.0, "mid_block_add_attention": False, "norm_type": "pixel",
                                      "causality_axis": "height"},
                         "sampling_rate": 16000}},
    "preprocessing": {"audio": {"sampling_rate": 16000, "max_wav_value": 32768.0, "duration": 5.12, "stereo": True,
                                "causal_padding": 3},
                      "stft": {"filter_length": 1024, "hop_length": 160, "win_length": 1024, "causal": True},
                      "mel": {"n_mel_channels": 64, "mel_fmin": 0, "mel_fmax": 8000}},
}
VOCODER_CONFIG = {
    # LTX-2: HiFi-GAN, 16 kHz mel hop 160 -> 24 kHz (x240)
    "2": {"upsample_initial_channel": 32, "resblock": "1", "upsample_rates": [6, 5, 2, 2, 2],
          "upsample_kernel_sizes": [16, 15, 8, 4, 4], "resblock_kernel_sizes": [3],
          "resblock_dilation_sizes": [[1, 3, 5]], "stereo": True},
    # LTX-2.3: BigVGAN at 16 kHz plus bandwidth extension to 48 kHz
    "2.3": {"vocoder": {"upsample_initial_channel": 64, "resblock": "AMP1", "upsample_rates": [5, 2, 2, 2, 2, 2],
                        "resblock_kernel_sizes": [3], "upsample_kernel_sizes": [11, 4, 4, 4, 4, 4],
                        "resblock_dilation_sizes": [[1, 3, 5]], "stereo": True, "use_tanh_at_final": False,
                        "activation": "snakebeta", "use_bias_at_final": False},
            "bwe": {"upsample_initial_channel": 32, "resblock": "AMP1", "upsample_rates": [6, 5, 2, 2, 2],
                    "resblock_kernel_sizes": [3], "upsample_kernel_sizes": [12, 11, 4, 4, 4],
                    "resblock_dilation_sizes": [[1, 3, 5]], "stereo": True, "use_tanh_at_final": False,
                    "activation": "snakebeta", "use_bias_at_final": False, "apply_final_activation": False,
                    "input_sampling_rate": 16000, "output_sampling_rate": 48000, "hop_length": 80, "n_fft": 512,
                    "win_size": 512, "num_mels": 64}},
}


def _randomize(module, gen, out_scale=None) -> dict:
    """``module``'s state dict with random values: weights ~ N(0, 1/fan_in), biases small, per-channel
    statistics positive; ``out_scale`` {key: factor} scales chosen weights."""
    sd = {}
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            sd[name] = t.clone()
            continue
        if name.endswith("std-of-means"):
            v = 0.5 + torch.rand(t.shape, generator=gen)
        elif name.endswith("mean-of-means"):
            v = 0.1 * torch.randn(t.shape, generator=gen)
        elif t.ndim >= 2:
            v = torch.randn(t.shape, generator=gen) / max(1, t[0].numel()) ** 0.5
        else:
            v = 0.05 * torch.randn(t.shape, generator=gen) + (1.0 if "norm" in name and "weight" in name else 0.0)
        sd[name] = (v * (out_scale or {}).get(name, 1.0)).contiguous()
    return sd


def vae_state_dicts(version="2", seed=3) -> tuple[dict, dict, dict]:
    """({video VAE keys}, {audio VAE autoencoder keys}, {vocoder keys}) with random weights, from ComfyUI's classes."""
    from comfy.ldm.lightricks.vae.audio_vae import AudioVAE
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    gen = torch.Generator().manual_seed(seed)
    video = _randomize(VideoVAE(config=video_vae_config(version)), gen, {"decoder.conv_out.conv.weight": 0.4})
    audio = AudioVAE(metadata={"config": {"audio_vae": AUDIO_VAE_CONFIG, "vocoder": VOCODER_CONFIG[version]}})
    return (video, _randomize(audio.autoencoder, gen), _randomize(audio.vocoder, gen))


def write_tiny_checkpoint(path, version="2", seed=3) -> dict:
    """Write a checkpoint with the tiny transformer (tests/helpers/tiny_ltxav.py), video VAE and audio VAE;
    return its metadata config."""
    path = str(path)
    transformer = write_tiny_ltxav(path + ".dm", version=version)
    sd = {f"model.diffusion_model.{k}": v for k, v in load_file(path + ".dm").items()}
    video, audio, vocoder = vae_state_dicts(version, seed)
    sd.update({f"vae.{k}": v for k, v in video.items()})
    sd.update({f"audio_vae.{k}": v for k, v in audio.items()})
    sd.update({f"vocoder.{k}": v for k, v in vocoder.items()})
    config = {"transformer": transformer, "vae": video_vae_config(version), "audio_vae": AUDIO_VAE_CONFIG,
              "vocoder": VOCODER_CONFIG[version]}
    save_file(sd, path, metadata={"config": json.dumps(config)})
    import os

    os.remove(path + ".dm")
    return config


def load_vaes(path, dtype=None):
    """(video VAE, audio VAE) as CheckpointLoaderSimple and LTXVAudioVAELoader load them from ``path``
    (``dtype``: the video VAE's, e.g. torch.float64 for a reference)."""
    import comfy.sd
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    video_sd = comfy.utils.state_dict_prefix_replace(sd, {"vae.": ""}, filter_keys=True)
    video = comfy.sd.VAE(sd=video_sd, metadata=metadata, dtype=dtype)
    audio_sd = comfy.utils.state_dict_prefix_replace(sd, {"audio_vae.": "autoencoder.", "vocoder.": "vocoder."},
                                                     filter_keys=True)
    audio = comfy.sd.VAE(sd=audio_sd, metadata=metadata)
    return video, audio
