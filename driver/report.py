"""What a run reports: ComfyUI's progress bar through the workers' steps, the step timings, and the
summary lines shown in the log and on the node."""
from __future__ import annotations

from .. import jobs
from .plan import NODE


class StepProgress:
    """ComfyUI's progress bar for a run on the workers, through every step in order to the last: the
    driver polls rank 0's step and may see 2, then 5 (each step passes ComfyUI's hook, and Interrupt)."""

    def __init__(self, total: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.shown = 0

    def to(self, step: int) -> None:
        import comfy.model_management

        while self.shown < step:
            self.shown += 1
            try:
                self.bar.update_absolute(self.shown)
            except comfy.model_management.InterruptProcessingException:
                # the server's progress hook raises on Interrupt and clears the flag: set it again so
                # the run's check tells the workers
                comfy.model_management.interrupt_current_processing(True)



SHOWN_NAMES = 3  # of the options sharing a prefix (a block patch per block), the first ones a log line names


def short_names(names) -> str:
    """Option names for a log line: those that differ only in their last part (one patch per block)
    as one prefix with the first SHOWN_NAMES last parts and a count of the rest."""
    groups: dict[str, list] = {}
    for name in names:
        prefix, _, last = name.rpartition("/")
        groups.setdefault(prefix, []).append(last if prefix else name)
    out = []
    for prefix, lasts in groups.items():
        if not prefix or len(lasts) == 1:
            out += [f"{prefix}/{last}" if prefix else last for last in lasts]
            continue
        more = f" and {len(lasts) - SHOWN_NAMES} more" if len(lasts) > SHOWN_NAMES else ""
        out.append(f"{prefix}/[{', '.join(lasts[:SHOWN_NAMES])}{more}]")
    return ", ".join(out)


def node_label(info: dict) -> str:
    """A worker's node as the log names it: host name, node address and Ray's node id (nodes on one
    machine share the first two)."""
    return f"{info.get('host', '?')} ({info['node']}, Ray node {info.get('node_id', '?')[:8]})"


MODEL_ACTIONS = {"read": "read from file", "repatched": "patches re-applied, file not read", "kept": "kept"}


def summary(group, memory: list[jobs.WorkerMemory], timings: dict, load: jobs.LoadResult | None = None,
            passes: list[int] | None = None, guidance: str = "", streamed_model: bool = True) -> str:
    """The time and per-worker memory lines shown in the log and on the node (GiB); ``passes``: the
    model passes each worker evaluated; ``guidance``: the job's passes (``guidance_passes.Passes.describe``);
    ``streamed_model``: the model's patcher streams its weights where the workers run DynamicVRAM (not
    ComfyUI-GGUF's)."""
    loading = f"model load {timings['model_load_s']} s"
    if load:
        loading += (f" ({MODEL_ACTIONS[load.action]}; file reads {load.loads}, patch changes {load.repatches} on "
                    "these workers)")
    lines = [f"{NODE}: {group.world} workers, {group.degrees.describe()}; {guidance + '; ' if guidance else ''}"
             f"sampling {timings['sampling_s']} s ({timings.get('worker_s_per_step', timings['s_per_step'])} s/step on "
             f"the workers), {loading}, Ray start {timings['ray_start_s']} s"]
    passes = passes or [None] * len(memory)
    for m, info, n in zip(memory, group.infos, passes):
        host = f"; host memory {m.host_rss_gib} GiB resident ({m.host_pss_gib} GiB by share)" if m.host_rss_gib else ""
        host += f"; {n} model passes" if n is not None else ""
        if m.peak_gib is None:
            lines.append(f"  worker {m.rank} ({info['device']}): no GPU memory figures on CPU{host}")
        else:
            streamed = " (streamed: DynamicVRAM)" if info.get("dynamic_vram") and streamed_model else ""
            lines.append(f"  worker {m.rank} ({info['device']}): peak {m.peak_gib} GiB above the forward's start "
                         f"(input and positions {m.pe_gib} GiB, blocks {m.blocks_gib} GiB); "
                         f"{m.allocated_gib} GiB allocated; weights on the GPU {m.weights_gib} GiB{streamed}{host}")
    return "\n".join(lines)





def summary_here(info: dict, m: jobs.WorkerMemory, timings: dict) -> str:
    """``summary``'s lines for a run in ComfyUI's process (GiB)."""
    lines = [f"{NODE}: in ComfyUI's process (one GPU: no workers); sampling {timings['sampling_s']} s "
             f"({timings.get('worker_s_per_step', timings['s_per_step'])} s/step)"]
    host = f"; host memory {m.host_rss_gib} GiB resident ({m.host_pss_gib} GiB by share)" if m.host_rss_gib else ""
    if m.allocated_gib is None:
        lines.append(f"  {info['device']}: no GPU memory figures{host}")
    else:
        streamed = " (streamed: DynamicVRAM)" if info.get("dynamic_vram") else ""
        peak = "" if m.peak_gib is None else f"peak {m.peak_gib} GiB above the sampling's start; "
        lines.append(f"  {info['device']}: {peak}{m.allocated_gib} GiB allocated; weights on the GPU "
                     f"{m.weights_gib} GiB{streamed}{host}")
    return "\n".join(lines)


def step_timings(marks: list[float]) -> dict:
    """From a worker's time marks (sampling start, then the end of each step): its median step and
    the time before the first step beyond one step (ComfyUI's set-up of the run on the worker)."""
    steps = [b - a for a, b in zip(marks[:-1], marks[1:])]
    if len(steps) < 2:
        return {}
    later = sorted(steps[1:])
    median = later[len(later) // 2]
    return {"worker_s_per_step": round(median, 4), "worker_mean_s_per_step": round(sum(later) / len(later), 4),
            "worker_setup_s": round(max(0.0, steps[0] - median), 3)}

