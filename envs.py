"""Every environment variable the pack reads: its name, default and meaning, in two tables (the users'
in the README, the developers' in docs/development.md). Values are read when used, so a test or a
benchmark may set them between runs; the workers get the driver's values when they start (``PASSTHROUGH``)."""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Var:
    name: str
    default: str
    meaning: str

    def get(self) -> str:
        """The value, or the default when unset or empty."""
        return os.environ.get(self.name) or self.default

    def on(self) -> bool:
        return self.get() not in ("", "0", "false", "False")

    def number(self) -> float:
        """The value as a number; a message naming the variable when it is not one."""
        try:
            return float(self.get() or 0)
        except ValueError:
            raise ValueError(f"environment variable {self.name}={self.get()!r} is not a number; "
                             f"{self.meaning}") from None


START_S = Var("LTXAV_PARALLEL_START_S", "600", "seconds the workers get to start and join their process groups")
LOAD_S = Var("LTXAV_PARALLEL_LOAD_S", "3600", "seconds a model load on the workers may take")
HEARTBEAT_S = Var("LTXAV_PARALLEL_HEARTBEAT_S", "15", "a worker that does not answer for this many seconds is a "
                  "fault (hung, frozen or overloaded)")
STALL_S = Var("LTXAV_PARALLEL_STALL_S", "900", "no sampling step for this many seconds is a fault")
SKIP_MEMORY_CHECK = Var("LTXAV_PARALLEL_SKIP_MEMORY_CHECK", "", "1: sample even when the planner predicts too "
                        "little GPU memory")
MEMORY_CAP_GIB = Var("LTXAV_PARALLEL_MEMORY_CAP_GIB", "", "GiB of GPU memory each worker may use (the rest of "
                     "the card is held), to behave like a smaller card; for benchmarks and tests")
MEMORY_LOG = Var("LTXAV_PARALLEL_MEMORY_LOG", "", "1: each worker logs its memory after the positional "
                 "embeddings and after the blocks (synchronises the GPU: slower)")
TRACE_DIR = Var("LTXAV_PARALLEL_TRACE_DIR", "", "a folder: each worker writes a torch.profiler trace of every "
                "sampling run there")
WORKERS_PER_GPU = Var("LTXAV_PARALLEL_WORKERS_PER_GPU", "1", "workers that share each GPU, over gloo instead of "
                      "NCCL (slow; with a cap each gets its share of the card): to measure several workers' GPU "
                      "memory and lengths on fewer GPUs, not their host memory (gloo stages GPU tensors through "
                      "pinned host buffers: 15 to 25 GiB a worker at 10,000 frames); for benchmarks and tests")
ONE_GPU_IN_PROCESS = Var("LTXAV_PARALLEL_ONE_GPU_IN_PROCESS", "1", "0: gpus=1 starts one Ray worker, as "
                         "several GPUs do, instead of sampling in ComfyUI's process (the worker's CUDA context then "
                         "sits beside ComfyUI's on the card); for benchmarks and tests")
LEAN_ATTENTION = Var("LTXAV_PARALLEL_LEAN_ATTENTION", "1", "0: the parallel samplers run ComfyUI's own attention "
                    "memory layout (rotary tables for every token, a new attention output and projection) instead "
                    "of the lean one (the same results, less memory); for benchmarks and tests")
FAULT = Var("LTXAV_PARALLEL_FAULT", "", "test hook: 'oom:RANK:STEP' makes that worker raise an out-of-memory "
            "error at that step")

USER = (START_S, LOAD_S, HEARTBEAT_S, STALL_S, SKIP_MEMORY_CHECK)  # the README's table
DEVELOPER = (MEMORY_CAP_GIB, MEMORY_LOG, TRACE_DIR, WORKERS_PER_GPU, ONE_GPU_IN_PROCESS, LEAN_ATTENTION,
             FAULT)  # benchmarks, tests and diagnosis: docs/development.md's table
TABLE = USER + DEVELOPER
# variables the workers get from the ComfyUI process: the pack's own, and those of NCCL, gloo, PyTorch's
# symmetric memory, NVSHMEM and xfuser's log level
PASSTHROUGH = ("LTXAV_PARALLEL_", "NCCL_", "GLOO_", "TORCH_SYMM_MEM_", "NVSHMEM_", "LOG_LEVEL")
# read by the workers themselves: set explicitly on each start ("" = unset), since Ray's processes may
# have inherited values from when Ray started
WORKER_VARS = (FAULT.name, MEMORY_CAP_GIB.name, WORKERS_PER_GPU.name, LEAN_ATTENTION.name)


def table_markdown(variables=TABLE) -> str:
    """A table of ``variables`` as the README and docs/development.md show it."""
    rows = [f"| `{v.name}` | {v.default or 'unset'} | {v.meaning} |" for v in variables]
    return "\n".join(["| variable | default | meaning |", "| --- | --- | --- |", *rows])


def workers_per_gpu() -> int:
    """``LTXAV_PARALLEL_WORKERS_PER_GPU`` as a count of at least 1; a message naming it otherwise."""
    n = WORKERS_PER_GPU.number()
    if n < 1 or n != int(n):
        raise ValueError(f"environment variable {WORKERS_PER_GPU.name}={WORKERS_PER_GPU.get()!r} is not a whole "
                         f"number of at least 1; {WORKERS_PER_GPU.meaning}")
    return int(n)
