"""The parallel kinds a worker hosts, one part each: sequence parallel (a forward's tokens over the ranks of
a group) and CFG-parallel (a step's guidance passes over the groups).

A kind is a part class, made once per process groups (and again when the workers regroup), with:

* ``KIND``: its name, which names its part and its report; ``WRAPPER``: the ComfyUI wrapper type it takes
  (a ``comfy.patcher_extension.WrappersMP`` name), and ``WRAPPER_KEY``: its key there. The key is the
  pack's own: the driver never sends it with a MODEL's options, every worker adds its part's wrapper;
* ``for_rank(rank)``: this process's part; ``degree(degrees)``: its degree in a
  ``sequence_parallel.groups.Degrees``;
* ``plan_terms(degrees, passes)``: what it adds to the memory planner (``driver.plan``), keyword terms of
  one worker's forward (``passes``: the job's ``guidance_passes.Passes``);
* on a part: ``wrapper(executor, ...)``, ``reset()`` at the start of each sampling run, and ``report()``,
  what it tells the driver of the run (merged into the worker's result).

Adding a kind is its module and one line in ``KINDS``.
"""
from __future__ import annotations

from typing import Protocol

from . import cfg_parallel, xdit_context_parallel

KINDS = (
    xdit_context_parallel.SequenceParallel,
    cfg_parallel.CfgParallel,
)


class Part(Protocol):
    """One process's part of a parallel kind (see the module's docstring)."""

    KIND: str
    WRAPPER: str
    WRAPPER_KEY: str

    def wrapper(self, executor, *args, **kwargs): ...

    def reset(self) -> None: ...

    def report(self) -> dict: ...


def own_keys(kinds=None) -> tuple[str, ...]:
    """Every kind's wrapper key: wrappers the driver does not send."""
    return tuple(kind.WRAPPER_KEY for kind in kinds or KINDS)


def make_parts(rank: int, kinds=None) -> dict[str, Part]:
    """This process's part of each kind, by name (after the process groups)."""
    return {kind.KIND: kind.for_rank(rank) for kind in kinds or KINDS}


def wrappers(parts: dict[str, Part]) -> dict:
    """(ComfyUI wrapper type, key) -> the part's wrapper, for ``patcher.add_wrapper_with_key``."""
    import comfy.patcher_extension

    types = comfy.patcher_extension.WrappersMP
    return {(getattr(types, p.WRAPPER), p.WRAPPER_KEY): p.wrapper for p in parts.values()}


def reset(parts: dict[str, Part]) -> None:
    for part in parts.values():
        part.reset()


def report(parts: dict[str, Part]) -> dict:
    """Every part's report of the run, in one dict."""
    out = {}
    for part in parts.values():
        out.update(part.report())
    return out


def plan_terms(degrees, passes, kinds=None) -> dict:
    """Every kind's terms for the memory planner."""
    out = {}
    for kind in kinds or KINDS:
        out.update(kind.plan_terms(degrees, passes))
    return out


def degrees_of(degrees, kinds=None) -> dict[str, int]:
    """Each kind's degree, by name."""
    return {kind.KIND: kind.degree(degrees) for kind in kinds or KINDS}
