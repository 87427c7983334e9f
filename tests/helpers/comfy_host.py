"""Finding the ComfyUI host, and LTXAV inputs built with stock ComfyUI nodes (for the host tests)."""
import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the pack: tests/helpers/ -> tests/ -> the repository root
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI"))
PACK_NAME = "ltxav_pack"  # the name tests import the pack under (ComfyUI uses the folder path)
HOST_MISSING = (f"ComfyUI host NOT FOUND at {COMFYUI_PATH} (no comfy/ldm/lightricks/av_model.py): "
                "host tests SKIPPED. Set COMFYUI_PATH to a ComfyUI 0.20.1 checkout with LTXAV.")


def host_available() -> bool:
    return (COMFYUI_PATH / "comfy" / "ldm" / "lightricks" / "av_model.py").is_file()


def import_host():
    """Put ComfyUI on sys.path in CPU mode (before comfy.model_management is imported)."""
    if str(COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(COMFYUI_PATH))
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401


def import_pack(run_init=True):
    """Import the repo as a package, the way ComfyUI imports a custom-node folder. With
    ``run_init=False`` its __init__ (node registration, which needs ComfyUI set up) does not run and
    only the plain modules are importable, as in a sequence-parallel worker."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    if run_init:
        spec.loader.exec_module(module)
    return module


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
