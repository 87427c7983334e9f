"""The tiny LTXAV checkpoints the tests use: the writer and configs are tools/tiny_models.py's (the demo
makes the same models); the LoRA writer and a non-LTX model are the tests' own."""
import torch

from .comfy_host import tools_module

_tiny = tools_module("tiny_models")
LTX23_OPTIONS, TINY_CONFIG, VERSIONS = _tiny.LTX23_OPTIONS, _tiny.TINY_CONFIG, _tiny.VERSIONS
context_width, write_tiny_ltxav = _tiny.context_width, _tiny.write_tiny_ltxav


def write_lora(ckpt_path, keys, path, rank=4, scale=0.3, seed=7):
    """A LoRA (lora_up / lora_down, ComfyUI's generic key format) on ``keys`` of the checkpoint."""
    from safetensors.torch import load_file, save_file

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
