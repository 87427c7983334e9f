"""CFG-parallel: a sampling step's guidance passes (the conditional and unconditional evaluations of
CFG, the three of DualCFGGuider or PerpNegGuider) on separate groups of ranks.

ComfyUI evaluates every pass of a step in one ``calc_cond_batch`` call, one conditioning list per pass
(``[positive, negative]`` for CFG; a pass that cfg 1 skips is None), and batches them into one forward.
With a cfg degree C the workers form C sequence-parallel groups (``sequence_parallel.groups``);
``CfgParallel.wrapper``, a ComfyUI CALC_COND_BATCH wrapper on every worker, has group
g evaluate only its share of the passes, each forward split over its own group, and all-gathers the
outputs over xfuser's CFG group (the ranks that hold the same sequence shard in each group). Every
rank then returns ComfyUI the outputs of every pass, and the guidance itself (cfg_function, pre- and
post-CFG functions) runs on all ranks alike, so they stay in step.

Passes are shared in contiguous blocks of ceil(n / C) (3 passes on 2 groups: 2 and 1). A call with
fewer than 2 passes (cfg 1, LTXVReferenceAudio's extra identity pass, or each of the separate calls
ComfyUI-LTXVideo's MultimodalGuider makes) runs whole on every group: the passes of separate calls cannot
be shared, as each call's outputs are needed before the guider makes the next. The driver picks the
degree (``choose_degree``) from the node's ``cfg_parallel`` input and the job's passes as ComfyUI's own
sampler and guider make them (``guidance_passes``); with ``auto`` it drops to sequence parallel when a
group would run a pass another group runs too, and when the memory plan fits only that
(``driver.plan.plan``).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import xfuser_compat

WRAPPER_KEY = "ltxav_cfg_parallel"
MODES = ("auto", "on", "off")


def largest_share(passes: int, degree: int) -> int:
    """Passes the busiest of ``degree`` groups runs: ceil(n / degree)."""
    return math.ceil(passes / degree)


def shares(active: list[int], degree: int) -> list[list[int]]:
    """The pass indices ``active`` in ``degree`` contiguous shares of ``largest_share`` (the last ones
    shorter or empty)."""
    k = largest_share(len(active), degree)
    return [active[g * k:(g + 1) * k] for g in range(degree)]


def choose_degree(mode: str, passes, world: int, ulysses: int, ring: int, video_heads: int,
                  node: str, unit: str = "GPUs") -> tuple[int, str]:
    """The cfg degree for ``world`` ranks and the job's ``passes`` (``guidance_passes.Passes``), and a
    note: why cfg-parallel is not used when the degree is 1, what the groups run twice otherwise (empty
    when nothing). ``auto``: the largest degree that splits every call's passes evenly (no group runs a
    pass another runs too), divides the GPU count and leaves a valid sequence-parallel group; ``on``: the
    largest that divides the GPU count, uneven shares and whole one-pass calls allowed; ``off``: 1.
    ``ulysses`` 0 = whatever is left over the ring; otherwise ``ulysses * ring`` must be what is left.
    ``unit``: what a worker is, as the messages count them (GPUs, CPU workers)."""
    if mode not in MODES:
        raise ValueError(f"{node}: input 'cfg_parallel' is {mode!r}; use one of {', '.join(MODES)}.")
    if mode == "off":
        return 1, "cfg_parallel is off"
    largest, per_step = passes.largest_call, passes.per_step
    if largest < 2:
        if per_step > 1:
            return 1, (f"{passes.guider} makes its {per_step} passes a step in separate calls of one pass each, and "
                       "cfg-parallel shares the passes of one call: each group would run every pass whole")
        return 1, "one guidance pass a step (cfg 1 or a guider without negative): nothing to split"
    if world < 2:
        return 1, f"one {unit[:-1]}"  # one GPU, one CPU worker
    for degree in range(min(largest, world), 1, -1):
        wasted = passes.wasted(degree)
        if world % degree or (mode == "auto" and wasted):
            continue
        sequence = world // degree
        if ulysses:
            if ulysses * ring != sequence:
                continue
        elif sequence % ring or video_heads % (sequence // ring):
            continue
        return degree, (f"each group also runs {wasted} pass{'es' if wasted > 1 else ''} a step that another group "
                        f"runs too ({_unsplit(passes, degree)})" if wasted else "")
    if mode == "on":
        counts = "an even gpus count" if largest == 2 else f"a gpus count divisible by one of 2 to {largest}"
        raise ValueError(f"{node}: input 'cfg_parallel' is 'on', but the {passes.describe()} cannot be split over "
                         f"gpus={world} with ulysses_degree={ulysses} and ring_degree={ring}: use {counts} with "
                         "ulysses_degree 0, or set cfg_parallel to 'auto' or 'off'.")
    single = passes.single_calls
    if single and any(world % d == 0 for d in range(2, min(largest, world) + 1)):
        return 1, (f"{single} of the {per_step} passes a step come{'s' if single == 1 else ''} in a call of "
                   f"{'its' if single == 1 else 'their'} own ({passes.guider} or a post-CFG function calls the model "
                   "again), which every cfg group would run whole: each pass is split over all "
                   f"{world} {unit} instead")
    return 1, f"the {passes.describe()} do not split evenly over {world} {unit}"


def _unsplit(passes, degree: int) -> str:
    single = passes.single_calls
    if single:
        return f"{single} a step come{'s' if single == 1 else ''} in a call of one pass, which every group runs whole"
    return f"{passes.largest_call} passes do not split evenly over {degree} groups"


class CfgParallel:
    """This process's part of CFG-parallel; create after the process groups
    (``sequence_parallel.groups``). ``passes`` counts the passes this rank evaluated since ``reset``. A
    ``parallel_kinds`` kind: its degree is the number of groups, its planner term the passes of the largest
    call one group's forward holds."""

    KIND = "cfg"
    WRAPPER = "CALC_COND_BATCH"
    WRAPPER_KEY = WRAPPER_KEY

    @classmethod
    def for_rank(cls, rank: int) -> CfgParallel:
        return cls()

    @staticmethod
    def degree(degrees) -> int:
        return degrees.cfg

    @staticmethod
    def plan_terms(degrees, passes) -> dict:
        return {"share": passes.largest_share(degrees.cfg)}

    def __init__(self):
        ps = xfuser_compat.load().parallel_state
        self.degree = ps.get_classifier_free_guidance_world_size()
        self.rank = ps.get_classifier_free_guidance_rank()
        self.group = ps.get_cfg_group().device_group if self.degree > 1 else None
        self.passes = 0

    def reset(self) -> None:
        self.passes = 0

    def report(self) -> dict:
        """The model passes this rank evaluated in the run."""
        return {"passes": self.passes}

    def wrapper(self, executor, model, conds, x_in, timestep, model_options, **kwargs):
        """ComfyUI CALC_COND_BATCH wrapper: this group's share of the passes, then every group's outputs."""
        active = [i for i, c in enumerate(conds) if c is not None]
        if self.degree == 1 or len(active) < 2:
            self.passes += len(active)
            return executor(model, conds, x_in, timestep, model_options, **kwargs)
        split = shares(active, self.degree)
        mine = split[self.rank]
        self.passes += len(mine)
        out = executor(model, [c if i in mine else None for i, c in enumerate(conds)], x_in, timestep,
                       model_options, **kwargs)
        width = len(split[0])
        block = torch.stack([out[i] for i in mine] + [torch.zeros_like(x_in)] * (width - len(mine)))
        gathered = [torch.empty_like(block) for _ in range(self.degree)]
        dist.all_gather(gathered, block, group=self.group)
        for g, share in enumerate(split):
            for j, i in enumerate(share):
                out[i] = gathered[g][j]
        return out
