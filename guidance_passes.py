"""A sampling job's guidance passes, counted by ComfyUI's own code: the job's sampler and guider run every
step of the job on a stand-in for the model (a dry run), and each ``calc_cond_batch`` call says how many
conditionings it evaluates.

What decides the count lives in ComfyUI and the node packs, not here: the cfg-1 shortcut
(``comfy.samplers.sampling_function`` runs only the positive at cfg 1, unless ``disable_cfg1_optimization``
is set, as the ``*_cfg_pp`` samplers do), guiders with their own ``predict_noise`` (DualCFGGuider,
PerpNegGuider, ComfyUI-LTXVideo's MultimodalGuider, which makes one call per pass with other
``transformer_options``), post-CFG functions that call ``calc_cond_batch`` again (LTXVReferenceAudio's
identity guidance) and samplers that evaluate the model more than once a step.

The dry run is the real ``guider.sample`` on a copy of the job and the MODEL's options (unpickled as the
workers unpickle them, ``model_transfer.loads_job``) on a clone of the MODEL with three wrappers:
PREPARE_SAMPLING loads nothing and hands the guider a stand-in that has the model's sampling constants and
conditioning code but no forward (nor the text connectors, which would run on the weights); PREDICT_NOISE
marks each model evaluation; CALC_COND_BATCH records the passes of each call and returns the input for
every one, so the sampler moves on. It costs the sampler's
arithmetic on the latent, no forward. Where it fails (a guider that calls the model outside
``calc_cond_batch``), the count falls back to the rule for ComfyUI's CFGGuider, saying so in the log.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from . import cfg_parallel, model_transfer

log = logging.getLogger(__name__)
KEY = "ltxav_guidance_passes"


@dataclasses.dataclass(frozen=True)
class Passes:
    """``evaluations``: for each model evaluation (a sampler step, or each of a step's evaluations), the
    passes of each ``calc_cond_batch`` call it made, in order. ``guider``: the guider's class name;
    ``how``: "dry run" or why the fallback rule counted them."""

    evaluations: tuple[tuple[int, ...], ...]
    guider: str = ""
    how: str = "dry run"

    @classmethod
    def uniform(cls, calls: tuple[int, ...], steps: int = 1, guider: str = "", how: str = "dry run") -> Passes:
        return cls(tuple(tuple(calls) for _ in range(steps)), guider, how)

    @property
    def calls(self) -> list[int]:
        return [n for ev in self.evaluations for n in ev]

    @property
    def per_step(self) -> int:
        """The most passes one model evaluation runs ("passes a step" in the logs)."""
        return max((sum(ev) for ev in self.evaluations), default=1) or 1

    @property
    def largest_call(self) -> int:
        return max(self.calls, default=1)

    @property
    def single_calls(self) -> int:
        """Passes a step that come in calls of one pass each (CFG-parallel cannot split those)."""
        return max((sum(1 for n in ev if n == 1) for ev in self.evaluations), default=0)

    def describe(self) -> str:
        """E.g. "2 guidance passes a step", "3 guidance passes a step (calls of 2 + 1)"."""
        n = self.per_step
        text = f"{n} guidance pass{'es' if n > 1 else ''} a step"
        shapes = {ev for ev in self.evaluations if ev}
        if len(shapes) == 1:
            (calls,) = shapes
            if len(calls) > 1:
                text += " (calls of " + " + ".join(str(c) for c in calls) + ")"
        elif shapes:
            text += " (its calls change from step to step)"
        return text

    def share(self, n: int, degree: int, group: int) -> int:
        """Passes of an ``n``-pass call that cfg group ``group`` of ``degree`` runs: its share
        (``cfg_parallel.shares``), or the whole call when it holds fewer than 2."""
        if degree == 1 or n < 2:
            return n
        return len(cfg_parallel.shares(list(range(n)), degree)[group])

    @classmethod
    def of(cls, passes) -> Passes:
        """``passes`` as Passes: an int is one call of that many passes a step."""
        return passes if isinstance(passes, Passes) else cls.uniform((passes,))

    def largest_share(self, degree: int) -> int:
        """The most passes one worker's ``calc_cond_batch`` call holds with cfg degree ``degree``."""
        return max((self.share(n, degree, 0) for n in self.calls), default=1) or 1

    def per_worker(self, degrees) -> list[int]:
        """The passes each rank evaluates over the run with ``degrees`` (the workers' own count:
        ``jobs.SampleResult.passes``); a rank's cfg group is ``rank // degrees.sequence``."""
        return [sum(self.share(n, degrees.cfg, rank // degrees.sequence) for n in self.calls)
                for rank in range(degrees.world)]

    def wasted(self, degree: int) -> int:
        """Passes a step that ``degree`` cfg groups would run more than once (calls that do not split
        evenly, and calls of one pass, which every group runs whole)."""
        return max((sum(self.share(n, degree, 0) * degree - n for n in ev) for ev in self.evaluations), default=0)


class _StandIn:
    """The guider's model during the dry run: ComfyUI's BaseModel for everything but a forward. Its
    conditioning code runs without the text embeddings (LTXAV's would run the connectors on the weights)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def extra_conds(self, **kwargs):
        kwargs.pop("cross_attn", None)
        return self._model.extra_conds(**kwargs)

    def apply_model(self, *args, **kwargs):
        raise _Uncountable("the guider runs the model outside calc_cond_batch")

    __call__ = forward = apply_model


class _Uncountable(RuntimeError):
    pass


class _Recorder:
    def __init__(self):
        self.evaluations: list[list[int]] = []
        self.open = False

    def prepare_sampling(self, executor, model, noise_shape, conds, model_options=None, **kwargs):
        return _StandIn(model.model), conds, []

    def predict_noise(self, executor, *args, **kwargs):
        self.evaluations.append([])
        self.open = True
        try:
            return executor(*args, **kwargs)
        finally:
            self.open = False

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options, **kwargs):
        if not self.open:  # a guider that does not go through outer_predict_noise: one evaluation a call
            self.evaluations.append([])
        n = sum(c is not None for c in conds)
        if n:
            self.evaluations[-1].append(n)
        return [x_in.clone() for _ in conds]


def dry_run(patcher, job_bytes: bytes) -> Passes:
    """Count the passes of the pickled job (``model_transfer.dumps_job(job, patcher)`` or
    ``ModelSpec.job_payload``: the job with ``patcher``'s options) by running its sampler and guider on a
    stand-in for ``patcher``'s model."""
    import comfy.patcher_extension

    recorder = _Recorder()
    probe = patcher.clone()
    wrappers = comfy.patcher_extension.WrappersMP
    probe.add_wrapper_with_key(wrappers.PREPARE_SAMPLING, KEY, recorder.prepare_sampling)
    probe.add_wrapper_with_key(wrappers.PREDICT_NOISE, KEY, recorder.predict_noise)
    probe.add_wrapper_with_key(wrappers.CALC_COND_BATCH, KEY, recorder.calc_cond_batch)
    job = model_transfer.loads_job(job_bytes, probe)  # the job's options set on the probe, as on a worker
    with torch.inference_mode():
        job.sample(probe, None)
    guider = getattr(job, "guider", None)
    return Passes(tuple(tuple(ev) for ev in recorder.evaluations if ev),
                  type(guider).__name__ if guider is not None else "CFGGuider")


def count(patcher, job, job_bytes: bytes, node: str) -> Passes:
    """The job's passes by a dry run; by ComfyUI's CFGGuider rule where the dry run fails (logged)."""
    try:
        passes = dry_run(patcher, job_bytes)
        if passes.evaluations:
            return passes
        why = "no model evaluation seen"
    except Exception as e:  # noqa: BLE001 - counting never stops a run: the rule below stands in
        log.debug("%s: dry run of the sampler failed", node, exc_info=True)
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    passes = fallback(patcher, job, why)
    log.warning("%s: could not count the guidance passes by a dry run of the sampler (%s); counting %d a step by "
                "the rule for ComfyUI's own guiders: the memory plan and cfg-parallel assume that", node, why,
                passes.per_step)
    return passes


def fallback(patcher, job, why: str) -> Passes:
    """ComfyUI's rule for its CFGGuider: positive and negative, or positive only at cfg 1 (unless the
    MODEL's options disable that shortcut) or without a negative; other guiders: one pass per
    conditioning they hold, in one call."""
    import comfy.samplers

    steps = job.total_steps
    no_shortcut = patcher.model_options.get("disable_cfg1_optimization", False)
    guider = getattr(job, "guider", None)
    if guider is None:  # KSampler
        both = no_shortcut or not math.isclose(job.cfg, 1.0)
        return Passes.uniform((2 if both else 1,), steps, "CFGGuider", why)
    conds = [k for k, v in getattr(guider, "original_conds", {}).items() if v]
    name = type(guider).__name__
    if type(guider).predict_noise is comfy.samplers.CFGGuider.predict_noise:
        both = "negative" in conds and (no_shortcut or not math.isclose(getattr(guider, "cfg", 1.0), 1.0))
        return Passes.uniform((2 if both else 1,), steps, name, why)
    return Passes.uniform((max(1, len(conds)),), steps, name, why)
