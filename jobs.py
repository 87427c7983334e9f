"""What crosses between ComfyUI's process (the driver) and the workers: the sampling job (a KSampler's
inputs, or a SamplerCustomAdvanced's guider, sampler and sigmas), what a model load did, each
worker's sampling result and memory figures, and the run's result for the nodes. Memory is in GiB
(2**30 bytes) everywhere."""
from __future__ import annotations

import dataclasses
from typing import Any

GIB = float(1 << 30)


def gib(n: float) -> float:
    """Bytes as GiB, rounded for reports."""
    return round(n / GIB, 3)


@dataclasses.dataclass
class KSamplerJob:
    """KSampler's inputs, sampled with ``comfy.sample.sample`` as KSampler does."""

    noise: Any
    latent: Any
    noise_mask: Any
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    positive: Any
    negative: Any
    denoise: float = 1.0
    disable_noise: bool = False
    start_step: int | None = None
    last_step: int | None = None
    force_full_denoise: bool = False

    @property
    def total_steps(self) -> int:
        return self.steps

    def sample(self, patcher, callback):
        import comfy.sample

        return comfy.sample.sample(patcher, self.noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                   self.positive, self.negative, self.latent, denoise=self.denoise,
                                   disable_noise=self.disable_noise, start_step=self.start_step,
                                   last_step=self.last_step, force_full_denoise=self.force_full_denoise,
                                   noise_mask=self.noise_mask, callback=callback, disable_pbar=True, seed=self.seed)


@dataclasses.dataclass
class GuiderJob:
    """SamplerCustomAdvanced's inputs: its guider (which refers to the MODEL), sampler and sigmas."""

    noise: Any
    latent: Any
    noise_mask: Any
    seed: int
    guider: Any
    sampler: Any
    sigmas: Any

    @property
    def total_steps(self) -> int:
        return self.sigmas.shape[-1] - 1

    def sample(self, patcher, callback):
        import comfy.model_management

        samples = self.guider.sample(self.noise, self.latent, self.sampler, self.sigmas, denoise_mask=self.noise_mask,
                                     callback=callback, disable_pbar=True, seed=self.seed)
        return samples.to(comfy.model_management.intermediate_device())


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What a worker did for a model: ``read`` the file, ``repatched`` the loaded weights, or ``kept``
    them; and its counts of file reads and patch changes so far."""

    action: str
    seconds: float
    loads: int
    repatches: int


@dataclasses.dataclass(frozen=True)
class WorkerMemory:
    """One worker's memory after a run, GiB. GPU figures are None on CPU: the peak above what was
    allocated when each forward began (weights, latents, conditioning) and its two phases (``pe_gib``: up to
    the positions, the input's projection included, at long lengths mostly the local hidden state;
    ``blocks_gib``), what stays allocated and PyTorch's highest allocation in the run's forwards (both less a
    held rest of an emulated card, which the benchmarks hold), the weights on the GPU (with DynamicVRAM the
    rest waits in host memory) and comfy-aimdo's device memory; host figures: RSS, PSS (pages shared with
    other processes, such as a memory-mapped checkpoint, counted by share) and USS (its own pages only)."""

    rank: int
    peak_gib: float | None = None
    pe_gib: float | None = None
    blocks_gib: float | None = None
    allocated_gib: float | None = None
    max_allocated_gib: float | None = None
    weights_gib: float | None = None
    aimdo_gib: float | None = None
    host_rss_gib: float | None = None
    host_pss_gib: float | None = None
    host_uss_gib: float | None = None


@dataclasses.dataclass
class SampleResult:
    """One worker's sampling run (``passes``: the model passes it evaluated; with CFG-parallel its group's
    share): rank 0's also carries the samples and the last denoised estimate. ``error``: why the job
    could not be rebuilt on the workers (nothing was sampled)."""

    interrupted: bool
    step: int
    memory: WorkerMemory
    step_times: list[float] = dataclasses.field(default_factory=list)
    passes: int = 0
    samples: Any = None
    x0: Any = None
    error: str | None = None


@dataclasses.dataclass
class RunResult:
    """A run for the nodes: rank 0's samples and x0, every worker's memory and model passes (in ComfyUI's
    process: its own, as rank 0; ``counted_passes``: what ``guidance_passes`` counted for each worker), the
    timings, what the model load did, the planner's predicted peak per worker and its parts (None when not
    checked), and the summary lines."""

    samples: Any
    x0: Any
    memory: list[WorkerMemory]
    timings: dict
    model_load: LoadResult | None  # None: sampled in ComfyUI's process (one GPU), nothing loaded on workers
    planned_peak_gib: float | None
    summary: str
    step_times: list[float] = dataclasses.field(default_factory=list)
    passes: list[int] = dataclasses.field(default_factory=list)
    planned_parts_gib: dict | None = None
    counted_passes: list[int] = dataclasses.field(default_factory=list)
