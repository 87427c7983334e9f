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


def tools_module(name: str):
    """A module of tools/ (the demo's, shared with the tests: tiny_models)."""
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    return importlib.import_module(name)


def make_conditioning(caption_channels: int, tokens: int = 8, seed: int = 0):
    """tools/tiny_models.make_conditioning: a CONDITIONING as LTXVConditioning gives, without Gemma."""
    return tools_module("tiny_models").make_conditioning(caption_channels, tokens, seed)


def make_latent(width=64, height=64, length=17, audio=True):
    """tools/tiny_models.make_latent: an LTXAV LATENT from the stock nodes."""
    return tools_module("tiny_models").make_latent(width, height, length, audio)


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
