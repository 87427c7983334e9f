"""ComfyUI started in a process that is not ComfyUI's own (a Ray worker, a benchmark's run) the way its
``main.py`` starts it, and what this process's ComfyUI runs with (its memory flags, DynamicVRAM).

``main.py`` does its set-up at import time (there is nothing to call), in two halves around the first
CUDA call; each half here calls ComfyUI's own functions in ``main.py``'s order. ``prepare``: ComfyUI on
``sys.path``, its flags (``comfy.options``: no command line parsed; the values given, e.g. the ComfyUI
process's), its CUDA allocator choice (``cuda_malloc``, when asked) and comfy-aimdo, before anything
touches CUDA. ``start``: the device, optionally the rest of the card held so that ComfyUI and its
allocators see a smaller one, ``comfy.model_management``, and DynamicVRAM on that device with ComfyUI's
streaming ModelPatcher (weights stay in host memory and page onto the GPU as the activations leave room).

Imports nothing heavy at module level: a benchmark calls ``prepare`` before torch is imported.
"""
from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)
# ComfyUI's memory flags, as each worker reports them (every flag of the ComfyUI process reaches it)
MEMORY_FLAGS = ("disable_dynamic_vram", "enable_dynamic_vram", "reserve_vram", "lowvram", "novram", "highvram",
                "gpu_only", "normalvram", "cpu", "disable_smart_memory", "async_offload")


def prepare(comfy_path: str, args: dict | None = None, dynamic_vram: bool | None = None,
            cuda_malloc: bool = False) -> bool | None:
    """``main.py``'s first half: ComfyUI at ``comfy_path`` importable, its flags set from ``args`` (flag ->
    value), ``cuda_malloc``: its allocator choice (PYTORCH_CUDA_ALLOC_CONF) made as ``main.py`` makes it,
    and comfy-aimdo loaded when DynamicVRAM may start (``dynamic_vram``: True, the ComfyUI process runs it;
    None, as ``main.py`` decides from the flags). Returns ``dynamic_vram`` for ``start``."""
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    import comfy.options  # noqa: F401  (its argument parsing stays off: flags are ComfyUI's defaults until set)
    from comfy.cli_args import args as flags
    from comfy.cli_args import enables_dynamic_vram

    for k, v in (args or {}).items():
        setattr(flags, k, v)
    if cuda_malloc:
        import cuda_malloc  # noqa: F401  (sets PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync as main.py does)
    if dynamic_vram or (dynamic_vram is None and enables_dynamic_vram()):
        import comfy_aimdo.control

        comfy_aimdo.control.init()
    return dynamic_vram


def held_bytes(total: int, cap: float, per_gpu: int = 1) -> int:
    """Bytes each process holds so that each of the ``per_gpu`` processes sharing a ``total``-byte GPU
    is left ``cap`` bytes (0 when the card is not larger than that)."""
    return max(0, int((total - per_gpu * cap) / per_gpu))


def hold_card(card_bytes: float, per_gpu: int = 1):
    """A tensor holding the rest of the current device beyond ``card_bytes`` (this process's share of a GPU
    ``per_gpu`` processes share), so that ComfyUI and its allocators see a card of that size; None when the
    card is not larger."""
    import torch

    _, total = torch.cuda.mem_get_info()
    n = held_bytes(total, card_bytes, per_gpu)
    return torch.empty(n, dtype=torch.uint8, device=torch.cuda.current_device()) if n else None


def start(dynamic_vram: bool | None = None, device: int | None = None, card_bytes: float | None = None,
          per_gpu: int = 1):
    """``main.py``'s second half, after ``prepare``: on the CPU when there is no CUDA device; ``device``
    (an index) made current before ComfyUI picks its own (the current one); the card held down to
    ``card_bytes`` (``hold_card``); ``comfy.model_management``; DynamicVRAM on ComfyUI's device when
    ``dynamic_vram`` (what ``prepare`` returned; None: ``main.py``'s own test of the flags, the GPU and
    torch). Returns the held tensor (None when nothing is held)."""
    import torch
    from comfy.cli_args import args as flags
    from comfy.cli_args import enables_dynamic_vram

    cuda = torch.cuda.is_available()
    if not cuda:
        flags.cpu = True
    if cuda and device is not None:
        torch.cuda.set_device(device)
    held = hold_card(card_bytes, per_gpu) if cuda and card_bytes else None
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if dynamic_vram is None:
        dynamic_vram = flags.enable_dynamic_vram or (enables_dynamic_vram() and mm.is_nvidia() and not mm.is_wsl())
        if dynamic_vram and not flags.enable_dynamic_vram and mm.torch_version_numeric < (2, 8):
            log.warning("torch %s: DynamicVRAM needs torch 2.8 or later; the legacy ModelPatcher runs",
                        torch.__version__)
            dynamic_vram = False
    if not (dynamic_vram and cuda):
        return held
    import comfy_aimdo.control

    if comfy_aimdo.control.init_device(mm.get_torch_device().index):
        level = (flags.verbose or "INFO").lower()  # comfy-aimdo's log level follows ComfyUI's, as in main.py
        getattr(comfy_aimdo.control, f"set_log_{level}", comfy_aimdo.control.set_log_info)()
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
        log.info("DynamicVRAM support detected and enabled")
    else:
        log.warning("comfy-aimdo could not start on this process's GPU: DynamicVRAM off here, every weight stays "
                    "on the GPU")
    return held


def dynamic_vram_enabled() -> bool:
    """Whether this process runs ComfyUI's DynamicVRAM (weights streamed from host memory)."""
    mm = sys.modules.get("comfy.memory_management")
    return bool(getattr(mm, "aimdo_enabled", False))


def aimdo_usage_gib() -> float | None:
    """comfy-aimdo's device memory in use in this process (the weights DynamicVRAM holds), GiB; None without it."""
    if not dynamic_vram_enabled():
        return None
    try:
        import comfy_aimdo.control

        return round(comfy_aimdo.control.get_total_vram_usage() / (1 << 30), 3)
    except Exception:  # noqa: BLE001 - an older comfy-aimdo: no figure
        return None


def memory_flags() -> dict:
    """ComfyUI's memory flags in this process (``MEMORY_FLAGS``: flag -> value)."""
    import comfy.cli_args

    return {k: getattr(comfy.cli_args.args, k, None) for k in MEMORY_FLAGS}
