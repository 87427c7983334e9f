"""Importing xfuser (xDiT) 0.4.5 for its process groups and long-context attention, on GPUs and on
CPU with gloo (the tests). This is the pack's one workaround for xfuser's import-time assumptions.

1. Only xfuser's core is imported. The top-level ``xfuser`` package eagerly imports every diffusers
   pipeline it ships; it is registered as a bare package (its ``__init__`` does not run), and the
   submodules we use load from its real folder.
2. Without an accelerator xfuser 0.4.5 (a) raises "No Accelerators" from
   ``envs.get_device_version()``, (b) leaves yunchang's Ulysses/ring groups unset because
   ``has_long_ctx_attn`` is False without CUDA, and (c) defines its attention classes on ``object``
   unless ``torch.cuda.is_available()`` is true while its two attention modules are imported.
   (a) and (b) are set on xfuser's own ``envs`` module; for (c) ``torch.cuda.is_available`` answers
   True only for the duration of those two imports, and is restored right after.
With CUDA present only step 1 applies.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types

import torch

SUPPORTED_XFUSER = "0.4.5"
_loaded = None


def _bare_package(name: str) -> None:
    """Register package ``name`` without running its __init__ (submodules still import normally)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not installed (pip install xfuser=={SUPPORTED_XFUSER})")
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__package__ = name
    sys.modules[name] = module


@contextlib.contextmanager
def _cuda_reported_available():
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_available = real


def load():
    """Import what the pack uses from xfuser; returns a namespace with ``parallel_state``,
    ``xFuserLongContextAttention`` and yunchang's ``update_out_and_lse`` (which xfuser is built on)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    os.environ.setdefault("LOG_LEVEL", "warning")  # xfuser logs DEBUG to stdout otherwise
    _bare_package("xfuser")
    _bare_package("xfuser.core")
    import xfuser.envs as envs

    accelerator = torch.cuda.is_available()
    if not accelerator:
        envs.get_device_version = lambda: None
        envs.PACKAGES_CHECKER.get_packages_info()["has_long_ctx_attn"] = True
    import xfuser.core.distributed.parallel_state as parallel_state

    guard = contextlib.nullcontext() if accelerator else _cuda_reported_available()
    with guard:
        attn = importlib.import_module("xfuser.core.long_ctx_attention")
        importlib.import_module("xfuser.core.long_ctx_attention.ring")
    from yunchang.ring.utils import update_out_and_lse

    _loaded = types.SimpleNamespace(parallel_state=parallel_state,
                                    xFuserLongContextAttention=attn.xFuserLongContextAttention,
                                    update_out_and_lse=update_out_and_lse)
    return _loaded
