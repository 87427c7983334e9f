"""Running LTXAV sampling from ComfyUI's sampler nodes: on Ray workers, or on one local GPU in ComfyUI's
own process, behind one ``POOL.run``.

- ``plan``: the pure plan of a run (workers, degrees, CFG-parallel or not, passes a forward, the memory
  verdict) and its refusals;
- ``workers``: the worker group (kept alive across prompts): Ray connection, start, process groups,
  watched calls, faults;
- ``on_workers`` / ``in_process``: the two runners;
- ``report``: progress, step timings and the summary lines.

The Ray connection itself (the private ``local`` cluster, joins, what a failed join says) is
``ray_cluster``'s. A cluster on loopback keeps every socket on 127.0.0.1: Ray's own processes, the
workers' process-group store, gloo's and NCCL's sockets. SIGTERM and SIGINT to ComfyUI stop the workers
and every Ray process the pack started before ComfyUI's own handling goes on.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import threading

import torch

from .. import jobs, models
from . import in_process, on_workers, plan, report, workers
from .plan import NODE, ParallelSettings

log = logging.getLogger(__name__)
__all__ = ["NODE", "POOL", "ParallelSampler", "ParallelSettings", "in_process", "install_signal_handlers",
           "on_workers", "plan", "report", "workers"]


class ParallelSampler(workers.Workers):
    """The pack's one worker group (per ComfyUI process), and the sampler nodes' one ``run``."""

    def run(self, patcher, job: jobs.KSamplerJob | jobs.GuiderJob, settings: ParallelSettings) -> jobs.RunResult:
        """Sample ``job`` on the workers (on one local GPU: in this process, ``in_process.run_here``)."""
        models.family_of(patcher.get_model_object("diffusion_model"), NODE)  # a model the pack cannot run: refused
        devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if plan.one_gpu_here(settings, workers.cpu_mode(), devices):
            return in_process.run_here(self, patcher, job)
        return on_workers.run_on_workers(self, patcher, job, settings)


POOL = ParallelSampler()


def install_signal_handlers() -> None:
    """On SIGTERM and SIGINT, stop the workers and the Ray processes the pack started, then go on as
    before (ComfyUI's Ctrl-C handling, or the default: the process ends). Ray sets its own SIGTERM
    handler only when ray.init runs in the main thread, and ComfyUI runs nodes in another one, so
    without this a SIGTERM leaves Ray's processes behind. Call from the main thread (ComfyUI loads
    custom nodes there)."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("%s: not in the main thread: SIGTERM/SIGINT will not stop Ray's processes", NODE)
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if previous == signal.SIG_IGN or getattr(previous, "func", None) is _on_signal:
            continue  # ignored on purpose (ComfyUI goes on), or installed already (the pack loaded twice)
        signal.signal(sig, functools.partial(_on_signal, previous))


def _on_signal(previous, signum, frame):
    POOL.shutdown(f"{signal.Signals(signum).name} received")
    if callable(previous):
        return previous(signum, frame)
    # SIG_DFL, or a handler set outside Python (None): the default action ends the process, as
    # without the pack
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return None
