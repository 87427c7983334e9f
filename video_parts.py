"""The part of saving a clip that runs where the VAE is (a Ray worker, or ComfyUI's process on one GPU):
the video VAE sent as its decoder's weights and rebuilt by ComfyUI, and one part of the clip decoded and
encoded (``decode_part``). ``video_save`` drives it; ``ray_worker`` runs it.

A part is encoded as consecutive standalone MP4 segments of about ``SEGMENT_BYTES`` each (a new one, with
a new keyframe, once the current one passes it at a batch's end), and ``decode_part`` yields each segment
as soon as it is finished: in a worker, a Ray streaming generator hands it to ComfyUI's process at once, so
the worker holds the segment being written and at most ``SEGMENTS_AHEAD`` sent ones the driver has not
taken yet (Ray's generator backpressure), whatever the part's length. The last item is the ``PartResult``."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import uuid
import weakref
from collections.abc import Iterator

import torch

from . import decode_plan, instrumentation, jobs, video_decode, video_file

_VAE_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VAE object -> key the workers know it by
SEGMENT_BYTES = 16 << 20  # a part's MP4 segment is finished once its bytes pass this (checked at a batch's end)
SEGMENTS_AHEAD = 2  # segments a worker may have sent that the driver has not taken yet (Ray's backpressure)


def load_vae_here(vae, plan: decode_plan.Plan) -> None:
    """The VAE on its device, with room for a decode step of the largest tile (ComfyUI's own estimate)."""
    import comfy.model_management

    h = max(n for _, n in plan.rows.tiles)
    w = max(n for _, n in plan.cols.tiles)
    step = (1, 128, plan.step + 2, h, w)
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=vae.memory_used_decode(step, vae.vae_dtype),
                                           force_full_load=vae.disable_offload)


@dataclasses.dataclass
class PartJob:
    """What a worker decodes: the video latent (the clip's latent frames from ``latent_start`` on: a part's
    slice, ``of``), the plan, the frame rate; ``frames``: return the uint8 frames instead of encoded
    segments (for tests and short clips); ``segment_bytes``: the segments' size (the driver's
    ``SEGMENT_BYTES``: the workers are other processes)."""

    latent: torch.Tensor  # a meta tensor while it travels apart (``for_ray``)
    plan: decode_plan.Plan
    fps: float
    frames: bool = False
    segment_bytes: int = SEGMENT_BYTES
    latent_start: int = 0

    @classmethod
    def of(cls, video: torch.Tensor, plan: decode_plan.Plan, part: tuple[int, int], fps: float,
           **kw) -> PartJob:
        """The job for output frames ``part`` [start, stop) of the clip ``video``: only the latent frames they
        are decoded from (``plan.latents_for``: the part and its halo), copied to the CPU."""
        a, b = plan.latents_for(*part)
        return cls(video[:, :, a:b].detach().to("cpu", copy=True).contiguous(), plan, fps, latent_start=a, **kw)

    def for_ray(self) -> tuple[PartJob, object]:
        """This job with its latent left as a shape and dtype (a meta tensor), and the latent's bytes as a NumPy
        array: Ray puts an array in its object store as it is, and a worker reads it there in place
        (``with_latent``). A tensor inside the job's pickle is copied twice on the worker's heap instead (the
        pickle's bytes, then the tensor)."""
        latent = self.latent.contiguous()
        return (dataclasses.replace(self, latent=torch.empty(latent.shape, dtype=latent.dtype, device="meta")),
                latent.reshape(-1).view(torch.uint8).numpy())

    def with_latent(self, array) -> PartJob:
        """The job with ``for_ray``'s latent back: a tensor on the array's memory (the object store's,
        read-only: the decode only reads it, and moves each step to the VAE's device and dtype)."""
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            latent = torch.from_numpy(array)
        return dataclasses.replace(self, latent=latent.view(self.latent.dtype).view(self.latent.shape))


@dataclasses.dataclass
class Segment:
    """A finished piece of a worker's part: a standalone MP4 of the frames from ``first_frame`` on."""

    first_frame: int
    data: bytes


@dataclasses.dataclass
class PartResult:
    """A worker's part, frames [start, stop), after its segments (or as uint8 frames: ``images``): whether
    it was interrupted, its decode seconds, GPU peak above the start (GiB; None on CPU) and host memory
    (``instrumentation.host_memory``, and ``anon_gib``: ``instrumentation.host_anon`` at the part's start,
    once the VAE is on its device, after the first batch, the most at any batch's end, and at the end)."""

    start: int
    stop: int
    interrupted: bool = False
    images: torch.Tensor | None = None
    seconds: float = 0.0
    peak_gib: float | None = None
    host: dict = dataclasses.field(default_factory=dict)


def decode_part(vae, job: PartJob, frames: tuple[int, int], check=None,
                progress=None) -> Iterator[Segment | PartResult]:
    """Decode frames [start, stop) of ``job`` with ``vae`` and encode them (a worker's share; it runs where
    it is called): yields each ``Segment`` as soon as it is finished, then the ``PartResult``. ``check``
    raises ComfyUI's InterruptProcessingException to stop (the segment being written is dropped)."""
    import comfy.model_management

    start, stop = frames
    cuda = vae.device.type == "cuda"
    t0 = time.perf_counter()
    anon = {"start": instrumentation.host_anon(jobs.gib)}
    # inference mode is per thread: it holds across the yields as one thread resumes this (Ray's executor does)
    with torch.inference_mode():
        load_vae_here(vae, job.plan)
        anon["vae_loaded"] = instrumentation.host_anon(jobs.gib)
        if cuda:
            torch.cuda.reset_peak_memory_stats(vae.device)
            base = torch.cuda.memory_allocated(vae.device)
        batches = _noting(video_decode.decode_chunks(vae, job.latent, job.plan, frames, check=check, progress=progress,
                                                     latent_start=job.latent_start), anon)
        result = PartResult(start, stop)
        try:
            if job.frames:
                result.images = torch.cat(list(batches))
            else:
                yield from _segments(batches, job, start)
        except comfy.model_management.InterruptProcessingException:
            result.interrupted = True
        except torch.OutOfMemoryError as e:
            raise RuntimeError(f"out of GPU memory decoding frames {start}..{stop} ({str(e).splitlines()[0][:200]}): "
                               "use tiles (input 'tile_size' 512) or free the GPU") from None
    result.seconds = round(time.perf_counter() - t0, 3)
    if cuda:
        result.peak_gib = jobs.gib(torch.cuda.max_memory_allocated(vae.device) - base)
    anon["end"] = instrumentation.host_anon(jobs.gib)
    result.host = {**instrumentation.host_memory(jobs.gib), "anon_gib": anon}
    yield result


def _noting(batches, anon: dict):
    """``batches`` as they are, noting this process's ``host_anon`` after the first and its most at any."""
    for i, batch in enumerate(batches):
        yield batch
        now = instrumentation.host_anon(jobs.gib)
        if i == 0:
            anon["first_batch"] = now
        if now is not None:
            anon["batches_most"] = max(anon.get("batches_most", now), now)


def _segments(batches, job: PartJob, start: int) -> Iterator[Segment]:
    """``batches`` (frames from ``start`` on) encoded beside their decode (``video_file.encoding``) into
    segments of about ``job.segment_bytes``, each yielded once finished."""
    segments = video_file.Segments(job.fps, job.plan.width, job.plan.height, start, job.segment_bytes)
    try:
        with contextlib.closing(video_file.encoding(segments, batches)) as steps:
            for _ in steps:
                yield from (Segment(*s) for s in segments.take())
        segments.close()
    except BaseException:
        segments.abort()
        raise
    yield from (Segment(*s) for s in segments.take())


def vae_bytes(vae) -> bytes:
    """What a worker builds the video VAE from: its decoder's weights (and latent statistics) with the
    config and dtype, as a safetensors file in memory. The encoder stays behind (decoding does not use it)."""
    from safetensors.torch import save

    sd = {k: v.detach().to("cpu").contiguous() for k, v in vae.get_sd().items()
          if k.startswith(("decoder.", "per_channel_statistics."))}
    config = {**vae.first_stage_model.config, "encoder_blocks": []}  # a stub encoder there: nothing to load
    meta = {"config": json.dumps({"vae": config}), "dtype": str(vae.vae_dtype)}
    return save(sd, metadata=meta)


def vae_from_bytes(data: bytes):
    """``vae_bytes``'s VAE, built by ComfyUI (``comfy.sd.VAE``, as the loaders build it) on this process's
    device, in the sender's dtype."""
    import comfy.sd
    from safetensors.torch import load

    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = header.get("__metadata__", {})
    dtype = getattr(torch, meta["dtype"].removeprefix("torch."))
    with _without_encoder_warning():
        return comfy.sd.VAE(sd=load(data), metadata={"config": meta["config"]}, dtype=dtype)


@contextlib.contextmanager
def _without_encoder_warning():
    """ComfyUI warns of the missing keys when a VAE is built without its encoder: here that is on purpose."""

    class Drop(logging.Filter):
        def filter(self, record):
            return not str(record.getMessage()).startswith("Missing VAE keys")

    f = Drop()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


def vae_key(vae) -> str:
    """The key the workers hold ``vae`` under (one per VAE object: ComfyUI keeps a loader's output)."""
    key = _VAE_KEYS.get(vae)
    if key is None:
        key = _VAE_KEYS[vae] = uuid.uuid4().hex
    return key


class HeldVae:
    """The video VAE a worker holds for the save node (sent once per VAE object), and its parts decoded."""

    def __init__(self):
        self.vae = None
        self.key = None

    def load(self, key: str, data: bytes | None = None) -> bool:
        """Hold the VAE ``key``, built from ``data`` (``vae_bytes``) unless held already; False when it is not
        held and no data came (the driver then sends it)."""
        if key == self.key:
            return True
        if data is None:
            return False
        self.vae = self.key = None
        self.vae = vae_from_bytes(data)
        self.key = key
        return True

    def decode(self, job: PartJob, frames: tuple[int, int], stop, progress) -> Iterator[Segment | PartResult]:
        """``decode_part`` of ``job`` with the held VAE (its segments, then its result); ``stop`` (a
        threading.Event) set stops it, ``progress(n)`` gets the frames done."""
        import comfy.model_management

        if self.vae is None:
            raise RuntimeError("no VAE loaded")

        def check():
            if stop.is_set():
                raise comfy.model_management.InterruptProcessingException()

        return decode_part(self.vae, job, frames, check=check, progress=progress)
