"""An LTXAV latent saved as a video file, in bounded memory: the audio decoded as LTXVAudioVAEDecode
decodes it, the video decoded a few frames at a time (``video_decode``) and encoded as it comes
(``video_file``). On one GPU this runs in ComfyUI's process; with several, the frames are split into
one contiguous part per Ray worker of the parallel sampler: each worker decodes its part (with the
decoder's receptive radius of context on both sides, so its frames are those of the whole decode) and
encodes it into consecutive MP4 segments of about ``video_parts.SEGMENT_BYTES``, each sent as soon as it
is finished (a Ray streaming generator). ComfyUI's process takes the segments of all workers as they
arrive and writes each to a file of its own in a temporary folder beside the output file (removed
however the save ends); once every part is done, it copies the segments' packets into the file in frame
order, one segment in memory at a time, with the audio. So neither side holds more than a few segments
of encoded video, whatever the clip's length. The video VAE reaches the workers as its decoder's weights
and config (sent once per VAE, kept by each worker).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import time

import torch

from . import decode_plan, envs, video_decode, video_file, video_parts
from .video_parts import PartJob, PartResult, Segment, load_vae_here, vae_bytes, vae_key

log = logging.getLogger(__name__)
NODE = "LTXAV Save Video"


@dataclasses.dataclass(frozen=True)
class Settings:
    """The save node's choices: frame rate, tiles (VAEDecodeTiled's inputs; 0 = the whole frame / clip),
    and ``gpus`` (0: every GPU; one GPU, or 1: ComfyUI's process)."""

    fps: float = 25.0
    tile_size: int = 0
    overlap: int = 64
    temporal_size: int = 0
    temporal_overlap: int = 8
    gpus: int = 0


def clip_of(latent: dict, audio_latent: dict | None, node: str = NODE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The video latent [1, 128, T, H, W] and the audio latent [1, 8, T', 16] (or None) of the node's inputs:
    a video + audio latent (LTXVConcatAVLatent's, the samplers'), or LTXVSeparateAVLatent's two outputs."""
    samples = latent["samples"]
    parts = list(samples.unbind()) if getattr(samples, "is_nested", False) else [samples]
    video = parts[0]
    audio = parts[1] if len(parts) > 1 else None
    if audio_latent is not None:
        a = audio_latent["samples"]
        audio = a.unbind()[-1] if getattr(a, "is_nested", False) else a
    if video.ndim != 5 or video.shape[1] != 128:
        raise ValueError(f"{node}: input 'latent' holds a {list(video.shape)} tensor, not an LTX-2 video latent "
                         "[1, 128, frames, height, width]: connect the parallel sampler's LATENT (or KSampler's), or "
                         "LTXVSeparateAVLatent's video output.")
    if video.shape[0] != 1:
        raise ValueError(f"{node}: input 'latent' holds {video.shape[0]} clips; it saves one: pick one with "
                         "'Latent From Batch'.")
    if audio is not None and (audio.ndim != 4 or audio.shape[0] != 1):
        raise ValueError(f"{node}: the audio latent is {list(audio.shape)}, not an LTX-2 audio latent [1, 8, T, 16]: "
                         "connect LTXVSeparateAVLatent's audio output to input 'audio_latent'.")
    return video, audio


def decode_audio(audio_vae, audio_latent: torch.Tensor, node: str = NODE) -> dict:
    """The waveform: ComfyUI's LTXVAudioVAEDecode node run on it."""
    from comfy.ldm.lightricks.vae.audio_vae import AudioVAE
    from comfy_extras.nodes_lt_audio import LTXVAudioVAEDecode

    if not isinstance(getattr(audio_vae, "first_stage_model", None), AudioVAE):
        raise ValueError(f"{node}: input 'audio_vae' is not an LTX-2 audio VAE: connect 'LTXV Audio VAE Loader'.")
    return LTXVAudioVAEDecode.execute({"samples": audio_latent}, audio_vae).result[0]


def plan_for(vae, video: torch.Tensor, settings: Settings) -> decode_plan.Plan:
    return decode_plan.Plan.tiled(video.shape, settings.tile_size, settings.overlap, settings.temporal_size,
                                   settings.temporal_overlap, halo=video_decode.receptive_radius(vae))


# ----------------------------------------------------------------------------- ComfyUI's process

@dataclasses.dataclass
class Saved:
    """A saved clip: its file, frames, the seconds the decode and encode took, where (``workers``: 0 in
    ComfyUI's process), each worker's part (None in ComfyUI's process), and the summary line."""

    path: str
    frames: int
    seconds: float
    workers: int
    parts: list[PartResult] | None
    summary: str


def workers_for(gpus: int, node: str = NODE) -> tuple[int, bool]:
    """(Ray workers to decode on, 0: ComfyUI's process; whether they are CPU processes) for input ``gpus``:
    0 with the parallel sampler's workers running: as many (they decode, none restart); 1 (or 0 with one
    GPU, or ComfyUI on --cpu): this process; else that many workers (0: every GPU)."""
    from .driver import POOL
    from .driver.workers import cpu_mode

    if gpus < 0:
        raise ValueError(f"{node}: input 'gpus' is {gpus}; use 0 for the sampler's workers (else every GPU), 1 for "
                         "ComfyUI's process, or a count.")
    cpu = cpu_mode()
    running = POOL.group
    if gpus == 0 and running is not None and running.cpu == cpu:
        return running.world, cpu
    if cpu:
        return (0 if gpus <= 1 else gpus), True
    per_gpu = envs.workers_per_gpu()
    if gpus == 0:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            gpus = int(ray.cluster_resources().get("GPU", 0)) * per_gpu
        else:
            gpus = torch.cuda.device_count() * per_gpu
    if gpus <= 1 and per_gpu == 1 and envs.ONE_GPU_IN_PROCESS.on():
        return 0, False
    return max(1, gpus), False


def save(vae, audio_vae, video: torch.Tensor, audio_latent: torch.Tensor | None, settings: Settings, path: str,
         metadata: dict | None = None, node: str = NODE) -> Saved:
    """Write ``video`` (and the audio of ``audio_latent``) to the MP4 ``path``; see the module's docstring."""
    try:
        plan = plan_for(vae, video, settings)
    except ValueError as e:
        raise ValueError(f"{node}: input 'vae' is {e}; connect the LTX-2 checkpoint's VAE (Load Checkpoint) or "
                         "use VAEDecodeTiled for other VAEs.") from None
    world, cpu = workers_for(settings.gpus, node)
    if audio_latent is not None and audio_vae is None:
        raise ValueError(f"{node}: the latent has audio, but input 'audio_vae' is not connected: connect "
                         "'LTXV Audio VAE Loader' (the checkpoint's audio VAE), or connect only "
                         "LTXVSeparateAVLatent's video output to save the video without sound.")
    audio = None
    t0 = time.perf_counter()
    if audio_latent is not None:
        with torch.inference_mode():
            audio = decode_audio(audio_vae, audio_latent, node)
    if world:
        from .driver.workers import free_gpu_for_workers

        free_gpu_for_workers(keep=getattr(audio_vae, "patcher", None))
    where = "in ComfyUI's process" if not world else f"on {world} {'CPU ' if cpu else ''}workers"
    log.info("%s: decoding %d frames %dx%d (%s tiles x %d latent frames a step) %s", node, plan.frames,
             plan.width, plan.height, "no" if plan.whole else f"{len(plan.time.tiles)} x {len(plan.spatial_tiles)}",
             plan.step, where)
    writer = video_file.VideoWriter(path, settings.fps, plan.width, plan.height, audio, metadata, plan.frames)
    parts = None
    try:
        if world:
            parts = save_on_workers(vae, video, plan, settings.fps, world, cpu, writer, node)
        else:
            save_here(vae, video, plan, writer)
        writer.close()
    except BaseException:
        writer.abort()
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    seconds = round(time.perf_counter() - t0, 2)
    sound = f", audio {audio['waveform'].shape[-1] / audio['sample_rate']:.2f} s" if audio else ", no audio"
    text = (f"{node}: {os.path.basename(path)}: {writer.frames} frames {plan.width}x{plan.height} at "
            f"{float(writer.rate):g} fps{sound}; decoded and encoded {where} in {seconds} s")
    if parts:
        text += "".join(f"\n  worker {i}: frames {p.start}-{p.stop - 1} in {p.seconds} s"
                        + (f", GPU peak {p.peak_gib} GiB above its start" if p.peak_gib is not None else "")
                        + (f", host memory {p.host['host_rss_gib']} GiB resident" if "host_rss_gib" in p.host else "")
                        for i, p in enumerate(parts))
    log.info("%s", text)
    return Saved(path, writer.frames, seconds, world, parts, text)


def save_here(vae, video: torch.Tensor, plan: decode_plan.Plan, writer: video_file.VideoWriter) -> None:
    """Decode in this process and encode as the frames come (the encoder in a thread of its own)."""
    import comfy.model_management
    import comfy.utils

    pbar = comfy.utils.ProgressBar(plan.frames)
    with torch.inference_mode():
        load_vae_here(vae, plan)
        batches = video_decode.decode_chunks(
            vae, video, plan, check=comfy.model_management.throw_exception_if_processing_interrupted,
            progress=lambda n: pbar.update_absolute(n, plan.frames))
        video_file.encode_in_background(writer, batches)


def save_on_workers(vae, video: torch.Tensor, plan: decode_plan.Plan, fps: float, world: int, cpu: bool,
                    writer: video_file.VideoWriter, node: str = NODE, frames: bool = False) -> list[PartResult]:
    """Each of ``world`` workers decodes and encodes one contiguous part of the frames, sending it in
    segments that wait on disk (beside ``writer``'s file) until every part is done; they are then written
    into ``writer`` in order. ``frames``: the workers return uint8 frames instead (tests). ``save`` frees
    the GPU of ComfyUI's models before (``free_gpu_for_workers``)."""
    import comfy.model_management
    import ray

    from . import model_transfer
    from .driver import POOL
    from .driver.report import StepProgress

    group = workers(world, cpu, node)
    hold_vae(group, vae, node)
    ranges = plan.split(world)
    POOL.status(f"decoding {plan.frames} frames on {len(ranges)} workers")
    part_jobs = []  # each worker gets its part's latent frames and their halo, not the clip's, apart from the job
    for r in ranges:
        job, latent = PartJob.of(video, plan, r, fps, frames=frames, segment_bytes=video_parts.SEGMENT_BYTES).for_ray()
        part_jobs.append((ray.put(model_transfer.dumps(job, {})), ray.put(latent)))
        del latent
    first = ranges[0][1] - ranges[0][0]
    beside = os.path.dirname(os.path.abspath(writer.target)) if isinstance(writer.target, (str, os.PathLike)) else None
    with tempfile.TemporaryDirectory(dir=beside, prefix=".ltxav-parts-") as spool:  # beside None: a BytesIO (tests)
        received = SegmentFiles(spool, node)
        streams = [a.decode_part.options(_generator_backpressure_num_objects=video_parts.SEGMENTS_AHEAD).remote(
            job, start, stop, latent) for a, (job, latent), (start, stop) in zip(group.actors, part_jobs, ranges)]
        parts = POOL._wait(streams, "decoding", envs.STALL_S.number(), progress=StepProgress(first), node=node,
                           on_item=received.take)
        if any(p.interrupted for p in parts) or comfy.model_management.processing_interrupted():
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException()
        received.write_into(writer)
    return parts


def hold_vae(group, vae, node: str = NODE) -> None:
    """Every worker of ``group`` holds ``vae``: the workers that hold it already answer so, and it is sent
    (once, through Ray's object store) only when one does not."""
    import ray

    from .driver import POOL

    key = vae_key(vae)
    held = POOL._wait([a.load_vae.remote(key) for a in group.actors], "loading the VAE", envs.LOAD_S.number(),
                      node=node)
    if not all(held):
        data = ray.put(vae_bytes(vae))
        POOL._wait([a.load_vae.remote(key, data) for a in group.actors], "loading the VAE", envs.LOAD_S.number(),
                   node=node)


class SegmentFiles:
    """The segments the workers send (``video_parts.Segment``), each written to a file of its own in
    ``folder`` as it arrives, then copied into the video file in frame order (``write_into``)."""

    def __init__(self, folder: str, node: str = NODE):
        self.folder, self.node = folder, node
        self.files: list[tuple[int, str]] = []  # (first frame, path)

    def take(self, rank: int, item: Segment | PartResult) -> PartResult | None:
        """``Workers._wait``'s ``on_item``: a segment goes to its file (nothing of it is kept), a worker's
        ``PartResult`` is its result."""
        if not isinstance(item, Segment):
            return item
        path = os.path.join(self.folder, f"{item.first_frame:09d}.mp4")
        try:
            with open(path, "wb") as f:
                f.write(item.data)
        except OSError as e:
            raise RuntimeError(f"{self.node}: cannot write the workers' video to a temporary file in {self.folder} "
                               f"({e.strerror or e}): saving on several GPUs needs room there for the encoded "
                               "video twice (its segments, then the file); free disk space in ComfyUI's output "
                               "folder, or save with input 'gpus' 1.") from None
        self.files.append((item.first_frame, path))
        return None

    def write_into(self, writer: video_file.VideoWriter) -> None:
        """Every segment's packets into ``writer``, in frame order, one segment in memory at a time; each file
        removed once copied."""
        for first, path in sorted(self.files):
            if first != writer.frames:
                raise RuntimeError(f"{self.node}: the workers' video has no frames {writer.frames}..{first - 1} "
                                   "(a segment is missing); run the prompt again.")
            with open(path, "rb") as f:
                data = f.read()
            writer.add_segment(data, first)
            del data
            os.remove(path)
        self.files = []


def workers(world: int, cpu: bool, node: str = NODE):
    """The parallel sampler's worker group when it has ``world`` workers; else a new one of that size (a
    later sampling run then restarts its own)."""
    from .driver import POOL
    from .sequence_parallel.groups import Degrees

    POOL.connect(POOL.address or "local")
    available = POOL.available(cpu)
    if world > available:
        raise ValueError(f"{node}: input 'gpus' asks for {world} {'CPU workers' if cpu else 'GPUs'} but the Ray "
                         f"cluster at {POOL.address!r} has {available}; use gpus <= {available} (0: every GPU, 1: "
                         "ComfyUI's process).")
    group = POOL.ensure_group(world, cpu)[0]  # the running one when it answers: its degrees stay
    if group.degrees is None:  # new workers: process groups as a sampling run's would be
        POOL.set_degrees(group, Degrees(world))
    return group
