"""Tiny LTXAV checkpoints for tests: real ComfyUI key names, random weights, config in metadata.

The checkpoint is written from ComfyUI's own ``LTXAVModel`` (so every key name is the real one) and
carries its config as safetensors metadata ``config = {"transformer": {...}}``, which
``comfy.model_detection`` reads; ``comfy.sd.load_diffusion_model`` then detects it as LTXAV.
Needs the ComfyUI host on ``sys.path``.
"""
import json

import torch
from safetensors.torch import save_file

# 12 heads: divisible by every Ulysses degree the tests use (1, 2, 3, 4).
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
}


def write_tiny_ltxav(path, num_layers=2, seed=0, std=0.2, **overrides):
    """Write a random-weight LTXAV diffusion-model checkpoint to ``path``; return its config."""
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel

    config = {**TINY_CONFIG, **overrides}
    model = LTXAVModel(num_layers=num_layers, dtype=torch.float32, device="cpu",
                       operations=comfy.ops.disable_weight_init, **config)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, tensor in model.state_dict().items():
        sd[name] = (torch.randn(tensor.shape, generator=gen) * std).contiguous()
    save_file(sd, str(path), metadata={"config": json.dumps({"transformer": config})})
    return config


def write_lora(ckpt_path, keys, path, rank=4, scale=0.3, seed=7):
    """A LoRA (lora_up / lora_down, ComfyUI's generic key format) on ``keys`` of the checkpoint."""
    from safetensors.torch import load_file

    sd = load_file(str(ckpt_path))
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for key in keys:
        out_dim, in_dim = sd[key + ".weight"].shape
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
