"""A MODEL's load recipe: the call a worker makes to read its weights from disk.

ComfyUI's loaders record one on the MODEL (``ModelPatcher.cached_patcher_init``: Load Checkpoint, Load
Diffusion Model). ComfyUI-GGUF's Unet loaders build theirs from a state dict and record none; for those
the recipe is that loader replayed in the worker (``load_gguf``: its ``UnetLoaderGGUF.load_unet`` on the
same file with the same options), which gives the worker ComfyUI-GGUF's own model (its patcher, its
on-the-fly dequantization, the file memory-mapped, so workers on one machine share its pages):

* the file: the one among the .gguf files its loader lists whose tensors are the model's (names, types
  and shapes, and of each tensor's bytes its first, middle and last ``SAMPLE_BYTES``), wherever the
  model's weights are now (still mapped from the file, in memory, or on the GPU); found once per loaded
  model, and again when the file changes;
* the options: ComfyUI-GGUF keeps the Advanced loader's dequant and patch dtypes on its layer class and
  ``patch_on_device`` on the patcher: read from there.

Nothing here imports ComfyUI-GGUF: it is recognised by its patcher class's module (the one that defines
``UnetLoaderGGUF``), whose own functions read the candidate files.
"""
from __future__ import annotations

import os
import sys
import weakref

import torch

SAMPLE_BYTES = 256
GGUF_LOADER = "ComfyUI-GGUF's Unet Loader (GGUF)"
# loaded model (its BaseModel's id) -> (weak reference to it, the .gguf file, its size and time)
_GGUF_FILES: dict[int, tuple] = {}


def recipe_of(patcher, node: str) -> tuple | None:
    """``(function, args)`` that rebuilds ``patcher``'s model as loaded from disk, or None when it was
    built some other way. Raises ValueError (naming ``node``) for a ComfyUI-GGUF model whose file is not
    among those its loader lists."""
    if patcher.cached_patcher_init is not None:
        return patcher.cached_patcher_init
    loader = gguf_loader_class(patcher)
    if loader is None:
        return None
    path = gguf_file(patcher, node)
    linear = next((m for m in patcher.model.diffusion_model.modules()
                   if isinstance(m, torch.nn.Linear) and hasattr(type(m), "dequant_dtype")), None)
    dequant = _dtype_option(getattr(type(linear), "dequant_dtype", None))
    patch = _dtype_option(getattr(type(linear), "patch_dtype", None))
    return load_gguf, (loader, path, dequant, patch, getattr(patcher, "patch_on_device", None))


def gguf_loader_class(patcher):
    """ComfyUI-GGUF's ``UnetLoaderGGUF`` when ``patcher`` is its model's patcher (None otherwise)."""
    module = sys.modules.get(type(patcher).__module__)
    loader = getattr(module, "UnetLoaderGGUF", None)
    return loader if loader is not None and hasattr(module, "gguf_sd_loader") else None


def _dtype_option(value) -> str:
    """A dtype as ComfyUI-GGUF's Advanced loader takes it: "default", "target" or a torch dtype's name."""
    if value is None:
        return "default"
    return value if isinstance(value, str) else str(value).removeprefix("torch.")


def load_gguf(loader, path: str, dequant_dtype: str, patch_dtype: str, patch_on_device):
    """In a worker: ComfyUI-GGUF's loader on ``path`` (its folder put first among ComfyUI's diffusion model
    folders when the file's name would find another file there)."""
    import folder_paths

    name = os.path.basename(path)
    if folder_paths.get_full_path("unet", name) != path:
        folder_paths.add_model_folder_path("diffusion_models", os.path.dirname(path), is_default=True)
    return loader().load_unet(name, dequant_dtype, patch_dtype, patch_on_device)[0]


def gguf_file(patcher, node: str) -> str:
    """The .gguf file ComfyUI-GGUF read ``patcher``'s model from (see the module docstring)."""
    import folder_paths

    base = patcher.model
    hit = _GGUF_FILES.get(id(base))
    if hit is not None and hit[0]() is base and hit[2] is not None and _stat(hit[1]) == hit[2]:
        return hit[1]
    module = sys.modules[type(patcher).__module__]
    weights = {k: p for k, p in base.diffusion_model.named_parameters() if getattr(p, "tensor_type", None) is not None}
    names = folder_paths.get_filename_list("unet_gguf")
    for name in names:
        path = folder_paths.get_full_path("unet", name)
        if path and _holds(module.gguf_sd_loader(path), weights):
            key = id(base)
            _GGUF_FILES[key] = (weakref.ref(base, lambda _, key=key: _GGUF_FILES.pop(key, None)), path, _stat(path))
            return path
    folders = ", ".join(folder_paths.get_folder_paths("diffusion_models"))
    raise ValueError(f"{node}: the MODEL comes from {GGUF_LOADER}, but none of the {len(names)} .gguf files that "
                     f"loader lists holds its weights (searched: {folders}); the workers load the model from its "
                     "file: keep the file in ComfyUI's diffusion_models (or unet) folders, or use gpus=1, which "
                     "samples in ComfyUI's process.")


def _stat(path: str) -> tuple | None:
    """A file's size and time (None once it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _holds(state_dict: dict, weights: dict) -> bool:
    """Whether a GGUF state dict (ComfyUI-GGUF's reader) holds ``weights``: the same tensor for every
    name, of the same type and shape, and the same bytes where sampled."""
    if not weights:
        return False
    for key, w in weights.items():
        t = state_dict.get(key)
        if (t is None or getattr(t, "tensor_type", None) != w.tensor_type
                or tuple(t.tensor_shape) != tuple(w.tensor_shape)):
            return False
        if not torch.equal(_sample(t), _sample(w)):
            return False
    return True


def _sample(t: torch.Tensor) -> torch.Tensor:
    """The first, middle and last ``SAMPLE_BYTES`` of a GGUF tensor's stored bytes, on the CPU."""
    with torch.no_grad():
        raw = torch.Tensor.as_subclass(t, torch.Tensor).reshape(-1).view(torch.uint8)
        n = raw.numel()
        if n <= 3 * SAMPLE_BYTES:
            return raw.cpu()
        mid = (n - SAMPLE_BYTES) // 2
        return torch.cat([raw[:SAMPLE_BYTES], raw[mid:mid + SAMPLE_BYTES], raw[-SAMPLE_BYTES:]]).cpu()

