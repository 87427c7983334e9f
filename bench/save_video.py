"""Saving a long LTX-2 clip as a video file: LTXAV Save Video against stock ComfyUI's chain
(VAEDecodeTiled -> LTXVAudioVAEDecode -> CreateVideo -> SaveVideo, with the official templates'
VAEDecodeTiled settings: tile 512, overlap 64, temporal 4096, temporal overlap 8) on the same latents,
on an emulated small card: host memory (ComfyUI's process and the Ray workers, sampled), GPU peak and
wall time.

Usage: python bench/save_video.py [--comfy PATH] [--vae /tmp/ltx2_vaes_bench.safetensors] [--card-gb 24]
          [--frames 897,2577,5201] [--res 768x512] [--variants stock,node,node-tiled,node-workers]
          [--gpus 2] [--warm-frames 0] [--timeout 560] [--commit SHA] [--out results.jsonl] [--smoke]

Variants (each length and variant in a fresh process, ascending lengths):
  stock          VAEDecodeTiled(512, 64, 4096, 8) -> LTXVAudioVAEDecode -> CreateVideo(25 fps) -> SaveVideo
  node           LTXAV Save Video, gpus=1, its defaults (whole frames, whole clip), in this process
  node-tiled     LTXAV Save Video, gpus=1, with the templates' VAEDecodeTiled settings (stock's frames exactly)
  node-workers   LTXAV Save Video, gpus=--gpus Ray workers (two on one GPU: LTXAV_PARALLEL_WORKERS_PER_GPU=2),
                 each capped at --card-gb; the workers are started and given the VAE first (not timed)
  reference      stock's VAEDecodeTiled with the video VAE in float32 on the whole card (no file): the frames
                 the bf16 variants are compared with, so their own rounding is seen beside their gap to stock

1. Writes --vae once (kept when it is there with the same configs): an LTX-2 video VAE and audio VAE with
   the real configs (ComfyUI's LTX-2 layout: decoder 128->1024 channels, 5 resnets a level, three residual
   2x2x2 upsamplers, no timestep conditioning, as the LTX-2 checkpoint and diffusers' conversion have it;
   audio VAE ch 128, vocoder 1024 channels to 24 kHz), random weights (N(0, 1/fan_in), bf16), keys and
   metadata as in the LTX-2 checkpoint (``vae.*``, ``audio_vae.*``, ``vocoder.*``).
2. A run: ComfyUI set up as main.py sets it up (DynamicVRAM), a dummy tensor holding all but --card-gb
   GiB (not for node-workers: each worker holds its own share), the VAEs loaded as Load Checkpoint /
   LTXV Audio VAE Loader load them, random latents (video [1,128,F,H/32,W/32], audio [1,8,T,16] with
   T = ceil(frames / 25 * 25)); then the variant under torch.inference_mode(), timed, while a thread samples
   every 50 ms the resident memory of this process, of the Ray workers and of Ray's other processes, and
   the device memory in use (all processes, the dummy and the memory in use before excluded).
3. Records: seconds, host peaks above the start (after the VAEs are loaded; the workers' after they hold
   the VAE), GPU peak, the file read back with PyAV (frames, rate, durations), and sampled 8-bit frames
   before encoding (stock, node, node-tiled, reference); the summary compares the node's with stock's, and
   every variant's with the float32 reference's (levels apart, and the share of values that differ).

--latent-in-pickle: node-workers with each part's latent sent inside its job's pickle, as before ec8f040
(now it goes apart, as an array a worker reads in Ray's object store): the two transfers on one machine.
--warm-frames N: before the start, the same variant saves a clip of N frames (not measured), so what a
process's first decode loads once (CUDA's and cuDNN's kernels, the encoder's library) is in the start: the
figures are then a save's in a process that has saved before (a second prompt's).

--smoke: tiny widths on the CPU (no card, no DynamicVRAM): checks that every variant runs end to end.
"""
import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("save_video")
ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
TEMPLATE_TILES = (512, 64, 4096, 8)  # the official LTX-2 templates' VAEDecodeTiled settings

LTX2_VIDEO_VAE = {
    "_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128,
    "encoder_blocks": [["res_x", {"num_layers": 4}], ["compress_space_res", {"multiplier": 2}],
                       ["res_x", {"num_layers": 6}], ["compress_time_res", {"multiplier": 2}],
                       ["res_x", {"num_layers": 6}], ["compress_all_res", {"multiplier": 2}],
                       ["res_x", {"num_layers": 2}], ["compress_all_res", {"multiplier": 2}],
                       ["res_x", {"num_layers": 2}]],
    "decoder_blocks": [["res_x", {"num_layers": 5, "inject_noise": False}],
                       ["compress_all", {"residual": True, "multiplier": 2}],
                       ["res_x", {"num_layers": 5, "inject_noise": False}],
                       ["compress_all", {"residual": True, "multiplier": 2}],
                       ["res_x", {"num_layers": 5, "inject_noise": False}],
                       ["compress_all", {"residual": True, "multiplier": 2}],
                       ["res_x", {"num_layers": 5, "inject_noise": False}]],
    "scaling_factor": 1.0, "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": "uniform",
    "use_quant_conv": False, "causal_decoder": False, "timestep_conditioning": False,
    "encoder_base_channels": 128, "decoder_base_channels": 128}
LTX2_AUDIO_VAE = {
    "model": {"params": {"ddconfig": {"double_z": True, "mel_bins": 64, "z_channels": 8, "resolution": 256,
                                      "downsample_time": False, "in_channels": 2, "out_ch": 2, "ch": 128,
                                      "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [],
                                      "dropout": 0.0, "mid_block_add_attention": False, "norm_type": "pixel",
                                      "causality_axis": "height"}, "sampling_rate": 16000}},
    "preprocessing": {"audio": {"sampling_rate": 16000, "max_wav_value": 32768.0, "duration": 5.12, "stereo": True,
                                "causal_padding": 3},
                      "stft": {"filter_length": 1024, "hop_length": 160, "win_length": 1024, "causal": True},
                      "mel": {"n_mel_channels": 64, "mel_fmin": 0, "mel_fmax": 8000}}}
LTX2_VOCODER = {"upsample_initial_channel": 1024, "resblock": "1", "upsample_rates": [6, 5, 2, 2, 2],
                "upsample_kernel_sizes": [16, 15, 8, 4, 4], "resblock_kernel_sizes": [3, 7, 11],
                "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "stereo": True}


def configs(smoke: bool) -> dict:
    """The checkpoint's metadata config; --smoke: the same layouts at tiny widths and depths."""
    video, audio, vocoder = json.loads(json.dumps((LTX2_VIDEO_VAE, LTX2_AUDIO_VAE, LTX2_VOCODER)))
    if smoke:
        for key in ("encoder_blocks", "decoder_blocks"):
            for _, params in video[key]:
                if "num_layers" in params:
                    params["num_layers"] = 1
        video.update(encoder_base_channels=8, decoder_base_channels=4)
        audio["model"]["params"]["ddconfig"].update(ch=8, num_res_blocks=1)
        vocoder.update(upsample_initial_channel=32, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]])
    return {"vae": video, "audio_vae": audio, "vocoder": vocoder}


# ----------------------------------------------------------------------------- the VAE file

def write_vaes(path, smoke):
    """Random-weight video and audio VAEs with the checkpoint's key names and metadata (bf16; float32 for
    the smoke run)."""
    import torch
    from safetensors.torch import save_file

    if smoke:
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
    from comfy.ldm.lightricks.vae.audio_vae import AudioVAE
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    config = configs(smoke)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if smoke else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.device("meta"):
        video = VideoVAE(config=config["vae"])
    audio = AudioVAE(metadata={"config": config})  # small: built on the CPU (its filters are computed)
    sd = {}
    for prefix, module in (("vae.", video), ("audio_vae.", audio.autoencoder), ("vocoder.", audio.vocoder)):
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                sd[prefix + name] = t.clone()
                continue
            if name.endswith("std-of-means"):
                x = torch.ones(t.shape, device=dev)
            elif name.endswith("mean-of-means") or t.ndim < 2:
                x = 0.02 * torch.randn(t.shape, generator=g, device=dev)
            else:
                x = torch.randn(t.shape, generator=g, device=dev) / max(1, t[0].numel()) ** 0.5
            sd[prefix + name] = x.to(dtype).cpu().contiguous()
    t0 = time.perf_counter()
    save_file(sd, str(path) + ".part", metadata={"config": json.dumps(config), "bench": json.dumps({"smoke": smoke})})
    os.replace(str(path) + ".part", path)
    return dict(tensors=len(sd), bytes=os.path.getsize(path), write_s=round(time.perf_counter() - t0, 1))


def vaes_match(path, smoke):
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__", {})
    bench = json.loads(meta.get("bench", "{}"))
    return meta.get("config") == json.dumps(configs(smoke)) and bench.get("smoke") == smoke


# ----------------------------------------------------------------------------- one run (child)

TIMELINE_S = 2.0  # seconds between the timeline's samples
HOST_KEYS = ("driver", "driver_anon", "workers", "workers_anon", "ray")  # the host figures each run reports


class Sampler(threading.Thread):
    """Every ``period`` s: resident memory of this process (and its part that is not file pages or shared
    memory), of the Ray workers (``ray::LTXAVWorker``) and of the other processes below this one (Ray's
    own), and the device memory in use; their peaks."""

    def __init__(self, torch, cuda, period=0.05):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.torch, self.cuda, self.period = psutil, torch, cuda, period
        self.me = psutil.Process()
        self.stop_flag = threading.Event()
        self.now = self.sample()
        self.peak = dict(self.now)
        self.t0 = time.perf_counter()
        self.peak_at = dict.fromkeys(self.now, 0.0)  # seconds after the start at which each peak was sampled
        self.timeline = []  # every TIMELINE_S: (seconds, ComfyUI's process and the workers without file pages
        self.next_mark = 0.0  # and shared memory, bytes): when each grows

    def sample(self) -> dict:
        mine = self.me.memory_info()  # driver_anon: what is not file pages or shared memory (RssAnon)
        out = {"driver": mine.rss, "driver_anon": mine.rss - mine.shared, "workers": 0, "workers_anon": 0, "ray": 0}
        for p in self.me.children(recursive=True):
            try:
                kind = "workers" if "LTXAVWorker" in " ".join(p.cmdline()) else "ray"
                m = p.memory_info()
                out[kind] += m.rss
                if kind == "workers":  # without file pages and shared memory (Ray's object store is shared memory)
                    out["workers_anon"] += m.rss - m.shared
            except self.psutil.Error:
                pass
        if self.cuda:
            free, total = self.torch.cuda.mem_get_info()
            out["device"] = total - free
        return out

    def run(self):
        while not self.stop_flag.wait(self.period):
            try:
                self.now = self.sample()
            except Exception:  # noqa: BLE001 - a process ended between listing and reading
                continue
            t = time.perf_counter() - self.t0
            for k, v in self.now.items():
                if v > self.peak.get(k, 0):
                    self.peak[k], self.peak_at[k] = v, round(t, 2)
            if t >= self.next_mark:
                self.timeline.append((round(t, 1), self.now["driver_anon"], self.now["workers_anon"]))
                self.next_mark = t + TIMELINE_S

    def stop(self) -> dict:
        self.stop_flag.set()
        self.join(2)
        return self.peak


def gib(n):
    return round(n / GIB, 3)


def marking(phases: dict, start_anon: int, owner, name: str, what: str) -> None:
    """``owner.name`` notes ComfyUI's process's memory without file pages and shared memory (GiB above
    ``start_anon``) before and after each call, as ``phases[what + "_before" / "_after"]``: where a first save
    grows it (the audio's decode, ComfyUI's unload of its models, the segments' join)."""
    from ltxav_pack.instrumentation import host_anon

    real = getattr(owner, name)

    def anon():
        return host_anon(lambda n: gib(n - start_anon))

    def marked(*args, **kw):
        phases[f"{what}_before"] = anon()
        try:
            return real(*args, **kw)
        finally:
            phases[f"{what}_after"] = anon()

    setattr(owner, name, marked)


def child(a):
    rec = dict(kind="run", variant=a.variant, frames=a.frames_one, res=a.res, card_gb=a.card_gb, smoke=a.smoke,
               warm_frames=a.warm_frames, latent_in_pickle=a.latent_in_pickle)
    sys.path.insert(0, str(ROOT / "bench"))
    import common
    common.import_pack()
    from ltxav_pack import comfy_host
    # ComfyUI as its main.py starts it (the pack's comfy_host): Save Video reads the workflow from hidden inputs
    # only a server fills; --smoke: on the CPU, without cuda_malloc and comfy-aimdo
    flags = {"disable_metadata": True, **({"cpu": True} if a.smoke else {})}
    dynamic = comfy_host.prepare(str(Path(a.comfy).resolve()), flags, cuda_malloc=not a.smoke)
    workers = a.variant == "node-workers"
    import torch
    cuda = torch.cuda.is_available() and not a.smoke
    dummy = None
    if cuda:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        card = int(a.card_gb * GIB)
        if workers and card < total:
            os.environ["LTXAV_PARALLEL_MEMORY_CAP_GIB"] = f"{card / GIB:.6f}"  # each worker holds the rest
        elif card < total and a.variant != "reference":
            dummy = comfy_host.hold_card(card)
        rec.update(card_total_gib=gib(total), dummy_gib=gib(dummy.numel()) if dummy is not None else 0)
    comfy_host.start(dynamic)
    import comfy.memory_management
    rec["dynamic_vram"] = bool(comfy.memory_management.aimdo_enabled)
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import folder_paths

    from ltxav_pack import video_file, video_save
    from ltxav_pack.driver import workers as driver_workers

    out_dir = tempfile.mkdtemp(prefix="save_video-")
    folder_paths.set_output_directory(out_dir)
    t0 = time.perf_counter()
    sd, metadata = comfy.utils.load_torch_file(a.vae, return_metadata=True)
    vae = comfy.sd.VAE(sd=comfy.utils.state_dict_prefix_replace(sd, {"vae.": ""}, filter_keys=True), metadata=metadata,
                       dtype=torch.float32 if a.variant == "reference" else None)
    audio_vae = comfy.sd.VAE(sd=comfy.utils.state_dict_prefix_replace(
        sd, {"audio_vae.": "autoencoder.", "vocoder.": "vocoder."}, filter_keys=True), metadata=metadata)
    del sd
    rec.update(vae_load_s=round(time.perf_counter() - t0, 2), vae_dtype=str(vae.vae_dtype),
               vae_gib=gib(vae.model_size()), audio_vae_gib=gib(audio_vae.model_size()))

    w, h = (int(v) for v in a.res.split("x"))
    frames = a.frames_one
    video, audio = random_latents(torch, a.res, frames, seed=1)
    rec.update(latent_frames=video.shape[2], clip_float32_gib=gib(frames * h * w * 12))
    picks = sorted({i for i in (0, 1, frames // 2, 4088, 4089, frames - 1) if 0 <= i < frames})
    sampled = {}

    if workers and a.latent_in_pickle:  # the parts' latents inside the jobs' pickles, as before ec8f040
        video_save.PartJob.for_ray = lambda job: (job, None)
    if workers:  # the group and the VAE first: what a run after sampling finds
        t1 = time.perf_counter()
        group = video_save.workers(a.gpus, not cuda)
        video_save.hold_vae(group, vae)
        rec["workers_setup_s"] = round(time.perf_counter() - t1, 2)
    else:
        real_add = video_file.VideoWriter.add_frames

        def add_frames(self, batch):  # the frames as they go to the encoder
            for i in picks:
                if self.frames <= i < self.frames + batch.shape[0]:
                    sampled[i] = batch[i - self.frames].numpy().copy()
            return real_add(self, batch)

        video_file.VideoWriter.add_frames = add_frames

    if a.warm_frames and a.variant != "reference":
        rec["warm_s"] = warm(a, vae, audio_vae, workers, out_dir)
        sampled.clear()

    import gc
    gc.collect()
    sampler = Sampler(torch, cuda)
    start = dict(sampler.now)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()
    sampler.start()
    t0 = time.perf_counter()
    path = None
    try:
        with torch.inference_mode():
            if a.variant == "stock":
                path, times = stock(vae, audio_vae, video, audio, picks, sampled)
                rec["stock_node_s"] = times
            elif a.variant == "reference":
                stock_frames(vae, video, picks, sampled)
            else:
                settings = node_settings(a, workers)
                path = os.path.join(out_dir, "video", f"node_{a.variant}.mp4")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                real_audio = video_save.decode_audio

                def decode_audio(*args, **kw):  # when the audio is decoded: the phases of the host peaks
                    out = real_audio(*args, **kw)
                    rec["audio_decoded_at_s"] = round(time.perf_counter() - sampler.t0, 2)
                    return out

                video_save.decode_audio = decode_audio
                rec["driver_anon_phases_gib"] = phases = {}
                marking(phases, start["driver_anon"], video_save, "decode_audio", "audio")
                marking(phases, start["driver_anon"], driver_workers, "free_gpu_for_workers", "unload")
                marking(phases, start["driver_anon"], video_save.SegmentFiles, "write_into", "join")
                saved = video_save.save(vae, audio_vae, video, audio, settings, path)
                plan = video_save.plan_for(vae, video, settings)
                rec.update(plan=dict(whole=plan.whole, time_tiles=len(plan.time.tiles),
                                     spatial_tiles=len(plan.spatial_tiles), step=plan.step, halo=plan.halo),
                           summary_text=saved.summary)
                if saved.parts:
                    rec["parts"] = [dict(start=p.start, stop=p.stop, seconds=p.seconds, gpu_peak_gib=p.peak_gib,
                                         **p.host) for p in saved.parts]
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001
        import traceback
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:800]}", traceback=traceback.format_exc()[-2000:],
                   oom=isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower())
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    peak = sampler.stop()
    rec["host_start_gib"] = {k: gib(v) for k, v in start.items() if k != "device"}
    rec["host_peak_gib"] = {k: gib(v) for k, v in peak.items() if k != "device"}
    rec["host_peak_above_start_gib"] = {k: gib(peak[k] - start[k]) for k in HOST_KEYS}
    rec["host_peak_at_s"] = {k: sampler.peak_at[k] for k in HOST_KEYS}
    rec["host_anon_timeline_gib"] = [(t, gib(d - start["driver_anon"]), gib(w - start["workers_anon"]))
                                     for t, d, w in sampler.timeline]  # (s, ComfyUI's process, workers) above start
    if cuda:  # every process on the card, what emulates the small card (dummy, workers' held rest) excluded
        held = dummy.numel() if dummy is not None else 0
        if workers:
            per_gpu = int(os.environ.get("LTXAV_PARALLEL_WORKERS_PER_GPU") or 1)
            held = max(0, int(rec["card_total_gib"] * GIB) - per_gpu * int(a.card_gb * GIB))
        rec["gpu_in_use_at_start_gib"] = gib(start["device"] - held)
        rec["gpu_peak_gib"] = gib(peak["device"] - held)
        rec["gpu_peak_above_start_gib"] = gib(peak["device"] - start["device"])
        rec["torch_peak_above_start_gib"] = gib(torch.cuda.max_memory_allocated() - alloc0)
    if rec.get("ok") and path:
        rec["file"] = read_back(path)
    if sampled:
        np_path = os.path.join(a.samples, f"{a.variant}-{frames}.npz")
        import numpy as np
        np.savez(np_path, **{str(k): v for k, v in sampled.items()})
    if workers:
        from ltxav_pack.driver import POOL
        POOL.shutdown("benchmark run done")
    shutil.rmtree(out_dir, ignore_errors=True)
    del dummy
    return rec


def random_latents(torch, res: str, frames: int, seed: int):
    """Random video [1, 128, F, H/32, W/32] and audio [1, 8, T, 16] latents of a clip of ``frames`` at ``res``."""
    w, h = (int(v) for v in res.split("x"))
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(1, 128, (frames - 1) // 8 + 1, h // 32, w // 32, generator=g)
    audio = torch.randn(1, 8, math.ceil(frames / 25.0 * 25.0), 16, generator=g)
    return video, audio


def node_settings(a, workers: bool):
    """The save node's settings for the variant: the templates' tiles for node-tiled, else whole frames."""
    from ltxav_pack import video_save

    tiles = TEMPLATE_TILES if a.variant == "node-tiled" else (0, 64, 0, 8)
    return video_save.Settings(25.0, *tiles, gpus=a.gpus if workers else 1)


def warm(a, vae, audio_vae, workers, out_dir) -> float:
    """--warm-frames: the variant saves a clip of that many frames (random latents), untimed; its seconds."""
    import torch

    from ltxav_pack import video_save

    video, audio = random_latents(torch, a.res, a.warm_frames, seed=2)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if a.variant == "stock":
            stock(vae, audio_vae, video, audio, [], {}, prefix="video/warm")
        else:
            video_save.save(vae, audio_vae, video, audio, node_settings(a, workers), os.path.join(out_dir, "warm.mp4"))
    shutil.rmtree(os.path.join(out_dir, "video", "warm"), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.remove(os.path.join(out_dir, "warm.mp4"))
    return round(time.perf_counter() - t0, 2)


def stock_frames(vae, video, picks, sampled):
    """VAEDecodeTiled with the templates' settings; the frames at ``picks`` put in ``sampled`` as Save Video
    converts a frame before encoding."""
    import nodes

    images = nodes.VAEDecodeTiled().decode(vae, {"samples": video}, *TEMPLATE_TILES)[0]
    for i in picks:
        sampled[i] = (images[i] * 255).clamp(0, 255).byte().numpy().copy()
    return images


def stock(vae, audio_vae, video, audio, picks, sampled, prefix="video/stock"):
    """The stock chain, node by node, as the official LTX-2 templates wire it."""
    from comfy_extras.nodes_lt_audio import LTXVAudioVAEDecode
    from comfy_extras.nodes_video import CreateVideo, SaveVideo

    times = {}
    t = time.perf_counter()
    images = stock_frames(vae, video, picks, sampled)
    times["VAEDecodeTiled"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    sound = LTXVAudioVAEDecode.execute({"samples": audio}, audio_vae).result[0]
    times["LTXVAudioVAEDecode"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    clip = CreateVideo.execute(images, 25.0, sound).result[0]
    out = SaveVideo.execute(clip, prefix, "auto", "auto")
    times["CreateVideo+SaveVideo"] = round(time.perf_counter() - t, 2)
    item = out.ui.as_dict()["images"][0]
    import folder_paths
    return os.path.join(folder_paths.get_output_directory(), item["subfolder"], item["filename"]), times


def read_back(path):
    import av

    with av.open(path) as c:
        v, s = c.streams.video[0], (c.streams.audio[0] if c.streams.audio else None)
        return dict(bytes=os.path.getsize(path), frames=v.frames, fps=float(v.average_rate),
                    video_s=round(float(v.duration * v.time_base), 3),
                    audio_s=round(float(s.duration * s.time_base), 3) if s else None,
                    audio_rate=s.sample_rate if s else None, width=v.width, height=v.height)


# ----------------------------------------------------------------------------- driver (parent)

def compare_samples(folder, frames, against="stock", variants=("node", "node-tiled")):
    """Sampled 8-bit frames of each variant against ``against``'s: the most levels apart, and the share of
    values that differ."""
    import numpy as np

    out = {}
    for f in frames:
        want = Path(folder, f"{against}-{f}.npz")
        if not want.exists():
            continue
        w = np.load(want)
        for variant in variants:
            got = Path(folder, f"{variant}-{f}.npz")
            if got.exists():
                g = np.load(got)
                d = [np.abs(g[k].astype(int) - w[k].astype(int)) for k in w.files if k in g.files]
                out[f"{variant}-{f}"] = dict(frames=sorted(int(k) for k in w.files),
                                             max_levels=int(max(x.max() for x in d)),
                                             share_differing=round(float(np.mean([(x > 0).mean() for x in d])), 6),
                                             share_over_one=round(float(np.mean([(x > 1).mean() for x in d])), 6))
    return out


def run_child(a, variant, frames, argv_base):
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as tf:
        res_path = tf.name
    cmd = [sys.executable, __file__, *argv_base, "--child", "--variant", variant, "--frames-one", str(frames),
           "--child-out", res_path, "--samples", a.samples]
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, timeout=a.timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    try:
        rec = json.loads(Path(res_path).read_text())
    except (OSError, ValueError):
        rec = dict(kind="run", frames=frames, variant=variant, ok=False, error=f"child rc={rc}, no record")
    Path(res_path).unlink(missing_ok=True)
    rec.update(child_rc=rc, child_wall_s=round(time.perf_counter() - t0, 1))
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/opt/ComfyUI"), help="ComfyUI host folder")
    p.add_argument("--vae", default=None, help="the VAE file (written once); default /tmp/ltx2_vaes_bench[_smoke]")
    p.add_argument("--card-gb", type=float, default=24.0, help="emulated card, GiB (0: the whole card)")
    p.add_argument("--frames", default="897,2577,5201")
    p.add_argument("--res", default="768x512")
    p.add_argument("--variants", default="stock,node,node-tiled,node-workers")
    p.add_argument("--gpus", type=int, default=2, help="node-workers: Ray workers")
    p.add_argument("--warm-frames", type=int, default=0, help="save this many frames first, not measured")
    p.add_argument("--latent-in-pickle", action="store_true",
                   help="node-workers: send each part's latent inside its job's pickle (the transfer before ec8f040)")
    p.add_argument("--timeout", type=float, default=560, help="seconds per run (subprocess)")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None, help="JSON lines file")
    p.add_argument("--smoke", action="store_true", help="tiny widths on the CPU")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="stock", help=argparse.SUPPRESS)
    p.add_argument("--frames-one", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--samples", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.vae = a.vae or f"/tmp/ltx2_vaes_bench{'_smoke' if a.smoke else ''}.safetensors"
    if a.smoke and a.card_gb == 24.0:
        a.card_gb = 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {'child' if a.child else 'main'} %(name)s: %(message)s")
    if a.child:
        try:
            rec = child(a)
        except Exception as e:  # noqa: BLE001 - a failure before the run: still a record
            import traceback
            rec = dict(kind="run", frames=a.frames_one, variant=a.variant, ok=False,
                       error=f"{type(e).__name__}: {str(e)[:400]}", traceback=traceback.format_exc()[-2000:])
        Path(a.child_out).write_text(json.dumps(rec))
        log.info("run %s", json.dumps({k: v for k, v in rec.items() if k != "traceback"}))
        return 0

    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    frames = sorted(int(f) for f in a.frames.split(",") if f.strip())
    command = " ".join(["python", "bench/save_video.py", *(argv if argv is not None else sys.argv[1:])])
    commit = a.commit
    if commit is None and (ROOT / ".git").exists():
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
    out = open(a.out, "a") if a.out else None
    a.samples = tempfile.mkdtemp(prefix="save_video-samples-")

    def emit(rec):
        line = json.dumps(rec)
        log.info("%s", line)
        if out:
            out.write(line + "\n")
            out.flush()

    if vaes_match(a.vae, a.smoke):
        log.info("VAE file %s already written", a.vae)
    else:
        paths = f"sys.path.insert(0, {str(Path(a.comfy).resolve())!r}); sys.path.insert(0, {str(ROOT / 'bench')!r}); "
        r = subprocess.run([sys.executable, "-c", "import sys, json; " + paths + "import save_video as b; "
                            f"print(json.dumps(b.write_vaes({a.vae!r}, {a.smoke!r})))"], capture_output=True, text=True)
        if r.returncode != 0:
            log.error("VAE file write failed:\n%s", r.stderr[-3000:])
            emit(dict(kind="vae_file", ok=False, error=r.stderr[-1000:]))
            return 1
        emit(dict(kind="vae_file", ok=True, path=a.vae, **json.loads(r.stdout.strip().splitlines()[-1])))

    argv_base = ["--comfy", a.comfy, "--vae", a.vae, "--card-gb", str(a.card_gb), "--res", a.res,
                 "--gpus", str(a.gpus), "--warm-frames", str(a.warm_frames)] + (["--smoke"] if a.smoke else []) \
        + (["--latent-in-pickle"] if a.latent_in_pickle else [])
    for f in frames:
        for variant in variants:
            rec = run_child(a, variant, f, argv_base)
            rec.update(commit=commit, malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
            emit(rec)
    summary = dict(kind="summary", command=command, card=device_name(), emulated_card_gib=a.card_gb,
                   workers_per_gpu=os.environ.get("LTXAV_PARALLEL_WORKERS_PER_GPU", "1"),
                   frames_vs_stock=compare_samples(a.samples, frames),
                   frames_vs_float32=compare_samples(a.samples, frames, "reference", ("stock", "node", "node-tiled")),
                   commit=commit, comfyui=str(a.comfy),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   python=platform.python_version())
    emit(summary)
    if out:
        out.close()
    shutil.rmtree(a.samples, ignore_errors=True)
    return 0


def device_name():
    try:
        import torch
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())
