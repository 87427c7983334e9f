"""The model a Ray worker holds, and each job's patcher rebuilt on it (``ray_worker`` serves them to the driver).

The worker rebuilds the model from what ``model_transfer.model_spec`` sent: the file is read only when the
file key changes; for a changed model key (weight patches) it clones the loaded model with the new patches,
and ComfyUI's patcher restores the original weights from its backup before applying them, as it does in its
own process when a LoRA strength changes. Each job comes with the model's options (wrappers, block patches,
callbacks, object patches) in its own pickle and samples on a fresh clone that carries them, as each sampler
node's MODEL in ComfyUI is one.
"""
from __future__ import annotations

import gc
import time
import uuid

import torch

from . import ffn_chunking, jobs, model_transfer, models
from .errors import one_line


class HeldModel:
    """One worker's model: ``base`` as read from its file (the patcher every patch set is cloned from) and
    ``weights``, base's clone with the current weight patches (every job's patcher is cloned from it)."""

    def __init__(self):
        self.base = None
        self.file_key = None
        self.weights = None
        self.model_key = None
        self.loads = 0  # file reads
        self.repatches = 0  # patch sets applied to the loaded weights without reading the file

    def load(self, file_key: str, key: str, recipe_bytes: bytes, spec_bytes: bytes | None) -> jobs.LoadResult:
        """Hold the model ``key`` (its file and weight patches): read the file only when ``file_key``
        differs from the loaded one; otherwise clone the loaded model with the new patches (ComfyUI's
        patcher puts the original weights back from its backup before applying them). The model's options
        come with each job (``job``)."""
        if key == self.model_key:
            return self._loaded("kept", 0.0)
        if spec_bytes is None:  # the driver sends the patches only to workers that lack this model
            raise RuntimeError("the model's patches were not sent: this worker holds another model than the "
                               "driver recorded")
        t0 = time.perf_counter()
        self.weights = None
        self.model_key = None
        read = file_key != self.file_key
        if read:
            self.base = None
            self.file_key = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            fn, args = model_transfer.loads(recipe_bytes, {})
            self.base = fn(*args)
            self.file_key = file_key
            self.loads += 1
        else:
            self.repatches += 1
        weights = self.base.clone()
        patches = model_transfer.loads(spec_bytes, model_transfer.model_refs(weights))
        weights.patches = {k: list(v) for k, v in patches.items()}
        weights.patches_uuid = uuid.uuid4()  # a new patch set: ComfyUI's loader unpatches and patches again
        models.family_of(weights.model.diffusion_model, "LTXAV Parallel Sampler")
        self.weights = weights
        self.model_key = key
        return self._loaded("read" if read else "repatched", time.perf_counter() - t0)

    def _loaded(self, action: str, seconds: float) -> jobs.LoadResult:
        return jobs.LoadResult(action, round(seconds, 3), self.loads, self.repatches)

    def check(self, parts: dict) -> dict:
        """Which of ``parts`` (name -> ``model_transfer.dumps`` pickle of one of the model's options) this
        worker cannot rebuild: name -> the error. Nothing is kept."""
        refs = model_transfer.model_refs(self.weights.clone())
        errors = {}
        for name, data in parts.items():
            try:
                model_transfer.loads(data, refs)
            except Exception as e:  # noqa: BLE001 - any failure to rebuild is reported, the option dropped
                errors[name] = one_line(e)
        return errors

    def job(self, payload: bytes, wrappers: dict):
        """This job's patcher (a clone of the loaded weights with the job's options, the FFN Chunker's and
        ``wrappers``: (wrapper type, key) -> the worker's wrapper) and the job, rebuilt from one pickle: what
        they share stays one object."""
        patcher = self.weights.clone()
        job = model_transfer.loads_job(payload, patcher)
        # the FFN Chunker's wrappers are the pack's own (not sent): add them again from its settings
        ffn_chunking.set_wrappers(patcher, ffn_chunking.ChunkSettings.from_options(
            patcher.model_options["transformer_options"]) is not None)
        for (kind, key), wrapper in wrappers.items():
            patcher.add_wrapper_with_key(kind, key, wrapper)
        return patcher, job

    def job_on_every_rank(self, payload: bytes, wrappers: dict, group):
        """``job(payload, wrappers)`` and None, or None, None and the error that stopped it; every rank of
        ``group`` (a CPU process group) learns whether all rebuilt theirs (a rank that samples alone would
        wait in its collectives)."""
        import torch.distributed as dist

        try:
            patcher, job, error = *self.job(payload, wrappers), None
        except Exception as e:  # noqa: BLE001 - reported to the driver; the workers stay
            patcher = job = None
            error = one_line(e)
        flag = torch.tensor([0 if error else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        if error is None and not flag.item():
            error = "another worker could not rebuild the job"
        return patcher, job, error
