"""Per-rank memory lines, off unless LTXAV_PARALLEL_MEMORY_LOG=1 (they synchronise the device), and
per-rank profiler traces of each sampling run, off unless LTXAV_PARALLEL_TRACE_DIR names a folder; and
a process's host memory (``host_memory``), as each run reports it.

Lines (logger ``...instrumentation``, INFO), for grepping (GiB: 2**30 bytes):
  [RayWorker r] PE Generated. VRAM: A GiB allocated, P GiB peak
  [RayWorker r] Blocks complete. Peak VRAM: P GiB (A GiB allocated)
  [RayWorker r] trace written: PATH
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

from . import envs

GIB = float(1 << 30)
log = logging.getLogger(__name__)


def enabled() -> bool:
    return envs.MEMORY_LOG.on()


def memory_gib(device: torch.device) -> tuple[float, float]:
    """(allocated, peak allocated) in GiB on ``device``; zeros off CUDA."""
    if device.type != "cuda":
        return 0.0, 0.0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) / GIB, torch.cuda.max_memory_allocated(device) / GIB


def pe_generated(rank: int, device: torch.device) -> None:
    alloc, peak = memory_gib(device)
    log.info("[RayWorker %d] PE Generated. VRAM: %.3f GiB allocated, %.3f GiB peak", rank, alloc, peak)


def blocks_complete(rank: int, device: torch.device) -> None:
    alloc, peak = memory_gib(device)
    log.info("[RayWorker %d] Blocks complete. Peak VRAM: %.3f GiB (%.3f GiB allocated)", rank, peak, alloc)


@contextlib.contextmanager
def traced(rank: int):
    """The ``with`` body under torch.profiler (CPU and CUDA activity, no Python stacks), its Chrome
    trace written to ``$LTXAV_PARALLEL_TRACE_DIR/rank{rank}-{pid}-{ns}.json``; nothing without it."""
    folder = envs.TRACE_DIR.get()
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


def host_anon(gib) -> float | None:
    """This process's resident memory less its file pages and shared memory (what its own allocations hold;
    psutil's rss - shared), in ``gib``'s unit; None without psutil. Cheap: for phases of a run."""
    try:
        import psutil

        m = psutil.Process().memory_info()
    except Exception:  # noqa: BLE001 - no psutil, or no access
        return None
    return gib(m.rss - m.shared)


def host_memory(gib) -> dict:
    """This process's host memory (``gib``: bytes to the unit): RSS (resident), PSS (resident, pages
    shared with other processes counted by share: a memory-mapped checkpoint read by two workers counts
    half in each) and USS (its own pages only)."""
    try:
        import psutil

        m = psutil.Process().memory_full_info()
    except Exception:  # noqa: BLE001 - no psutil, or no access: no host figures
        return {}
    return {f"host_{k}_gib": gib(getattr(m, k)) for k in ("rss", "pss", "uss") if hasattr(m, k)}
