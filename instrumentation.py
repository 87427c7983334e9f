"""Per-rank memory lines, off unless LTXAV_PARALLEL_MEMORY_LOG=1 (they synchronise the device), and
per-rank profiler traces of each sampling run, off unless LTXAV_PARALLEL_TRACE_DIR names a folder.

Lines (logger ``...instrumentation``, INFO), for grepping:
  [RayWorker r] PE Generated. VRAM: A GB allocated, P GB peak
  [RayWorker r] Blocks complete. Peak VRAM: P GB (A GB allocated)
  [RayWorker r] trace written: PATH
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

ENV = "LTXAV_PARALLEL_MEMORY_LOG"
TRACE_ENV = "LTXAV_PARALLEL_TRACE_DIR"
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


@contextlib.contextmanager
def traced(rank: int):
    """The ``with`` body under torch.profiler (CPU and CUDA activity, no Python stacks), its Chrome
    trace written to ``$LTXAV_PARALLEL_TRACE_DIR/rank{rank}-{pid}-{ns}.json``; nothing without it."""
    folder = os.environ.get(TRACE_ENV, "")
    if not folder:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank{rank}-{os.getpid()}-{time.time_ns()}.json")
    prof.export_chrome_trace(path)
    log.info("[RayWorker %d] trace written: %s", rank, path)
