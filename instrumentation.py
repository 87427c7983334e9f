"""Per-rank memory lines, off unless LTXAV_PARALLEL_MEMORY_LOG=1 (they synchronise the device).

Lines (logger ``...instrumentation``, INFO), for grepping:
  [RayWorker r] PE Generated. VRAM: A GB allocated, P GB peak
  [RayWorker r] Blocks complete. Peak VRAM: P GB (A GB allocated)
"""
from __future__ import annotations

import logging
import os

import torch

ENV = "LTXAV_PARALLEL_MEMORY_LOG"
GB = float(1 << 30)
log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0", "false", "False")


def memory_gb(device: torch.device) -> tuple[float, float]:
    """(allocated, peak allocated) in GB on ``device``; zeros off CUDA."""
    if device.type != "cuda":
        return 0.0, 0.0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) / GB, torch.cuda.max_memory_allocated(device) / GB


def pe_generated(rank: int, device: torch.device) -> None:
    alloc, peak = memory_gb(device)
    log.info("[RayWorker %d] PE Generated. VRAM: %.3f GB allocated, %.3f GB peak", rank, alloc, peak)


def blocks_complete(rank: int, device: torch.device) -> None:
    alloc, peak = memory_gb(device)
    log.info("[RayWorker %d] Blocks complete. Peak VRAM: %.3f GB (%.3f GB allocated)", rank, peak, alloc)
