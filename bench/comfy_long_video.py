"""Stock ComfyUI on an emulated small card: the longest LTX-2 audio-video clip its own load and
sampling path runs, with and without the pack's LTX FFN Chunker. Every number goes through ComfyUI:
the checkpoint is loaded with ``comfy.sd.load_diffusion_model`` (the UNETLoader path) and sampled with
``comfy.sample.sample`` (what KSampler calls), with DynamicVRAM started as ComfyUI's main.py starts it.

Usage: python bench/comfy_long_video.py --comfy PATH [--ckpt /tmp/ltx2.safetensors] [--layers 48]
          [--weights fp8|bf16] [--gguf Q8_0|Q4_0] [--gguf-pack PATH] [--card-gb 24] [--frames 897,1329,2577]
          [--variants stock,ffn-chunker]
          [--ffn-chunker] [--steps 1] [--res 768x512] [--ctx-len 1024] [--legacy] [--no-cuda-malloc]
          [--cfg 1.0] [--guider ksampler|cfg] [--gpus 1] [--cfg-parallel auto|on|off]
          [--timeout 300] [--commit SHA] [--out results.jsonl]

--cfg other than 1 runs positive and negative each step (ComfyUI batches them into one forward when
its own estimate for the batch fits, else runs them one after the other);
--guider cfg samples through a CFGGuider (SamplerCustomAdvanced's path; the parallel variants then
send a GuiderJob) instead of KSampler's ``comfy.sample.sample``. The parallel variants run the node's
``POOL.run`` with ``--gpus`` Ray workers (one per GPU; ``LTXAV_PARALLEL_WORKERS_PER_GPU=2`` puts two on each, over gloo) and ``--cfg-parallel``;
at ``--gpus 1`` the node samples in this process (no workers) unless ``LTXAV_PARALLEL_ONE_GPU_IN_PROCESS=0``.
--gguf Q8_0 (or Q4_0) writes a GGUF checkpoint instead (``write_gguf``: the same model, its tensors typed as
ComfyUI-GGUF's tools type them, the quantized ones random blocks) and every variant loads it with ComfyUI-GGUF's
``UnetLoaderGGUF`` (--gguf-pack, loaded as ComfyUI loads custom nodes; it imports ComfyUI's ``nodes``, which
needs PyAV). --tiny: tiny dims, a smoke run on the CPU (CPU workers; with --gguf in the test venv, whose shim
hands ComfyUI's detection a tiny GGUF's config).

1. Writes --ckpt once (kept if it is there with the same layers and weights): the LTX-2 diffusion
   model's real key names (``model.diffusion_model.*``, from ComfyUI's LTXAVModel built on the meta
   device), random weights (std 0.02, drawn on the GPU when there is one, one tensor at a time, so
   host memory stays low), block linear weights as fp8 e4m3 (--weights fp8, ~19 GB at 48 layers)
   or bf16 (everything else bf16), and safetensors metadata config = {"transformer": {...}} so
   ComfyUI detects LTXAV.
2. For each variant, each length (ascending) runs in a fresh subprocess, until the first that fails
   (out of memory, crash or timeout). A subprocess: sets ComfyUI up as main.py does (cuda_malloc,
   comfy_aimdo.control.init() before torch touches CUDA, then a dummy tensor holding (total - card)
   bytes so ComfyUI sees a --card-gb GiB card, then ``comfy_aimdo.control.init_device(index)``,
   ``CoreModelPatcher = ModelPatcherDynamic``, ``aimdo_enabled = True``; --legacy: none of it, the
   legacy ModelPatcher), loads, optionally applies the LTX FFN Chunker (auto=True), samples --steps
   steps at --cfg (default 1), euler/simple, on an empty video latent [1,128,F,H/32,W/32] joined with an empty
   audio latent [1,8,T,16] (T = ceil(frames/25*25), as LTXVEmptyLatentAudio) in a NestedTensor (as
   LTXVConcatAVLatent), with Gemma-free conditioning [[randn(1, L, 3840), {unprocessed_ltxav_embeds,
   frame_rate 25}]].
With BENCH_MEMORY_SNAPSHOT=1 a run also records the allocator's live blocks of 256 MiB or more when it ends
(at an out-of-memory error: when it failed) with where each was allocated (``live_blocks``).
3. Records per run: each diffusion-model forward's seconds (median and all; one forward a step at
   cfg 1), for stock also the median step from callback to callback (as the workers time theirs),
   sampling wall time, torch.cuda.max_memory_allocated / max_memory_reserved (the PyTorch
   allocator only: DynamicVRAM's weights live outside it), the device memory in use at its peak
   (cudaMemGetInfo polled every 20 ms, dummy excluded: what the 24 GB card would have held),
   ``patcher.loaded_size()`` after each forward (weights resident on the GPU, as ComfyUI counts them),
   host RSS (now and peak), OOM or not, ComfyUI's free-memory view at start.
JSON lines go to --out: one "run" record a subprocess, then a "summary" record (command, card, date,
commit, and the relative L2 of each parallel variant's latents against the stock variant's of the same
length: parallel against stock, parallel-chunker against ffn-chunker).
"""
import argparse
import datetime
import json
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("comfy_long_video")
ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30

LTX2_TRANSFORMER = dict(num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096,
                        audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048,
                        caption_channels=3840, in_channels=128, audio_in_channels=128,
                        rope_type="split", frequencies_precision="float64")


# ----------------------------------------------------------------------------- checkpoint

# --tiny (a CPU smoke run): the benchmarks' tiny dims, real options
TINY_TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                        audio_num_attention_heads=4, audio_attention_head_dim=4, audio_cross_attention_dim=16,
                        caption_channels=16, connector_num_attention_heads=2, connector_attention_head_dim=8,
                        in_channels=128, audio_in_channels=128, rope_type="split", frequencies_precision="float64")


def transformer_config(layers, tiny=False):
    return dict(TINY_TRANSFORMER if tiny else LTX2_TRANSFORMER, num_layers=layers)


def write_checkpoint(path, layers, weights, seed=0, tiny=False):
    """Stream a safetensors file tensor by tensor (``common.stream_checkpoint``)."""
    return bench_common().stream_checkpoint(path, transformer_config(layers, tiny), weights,
                                            {"layers": layers, "weights": weights, "seed": seed, "tiny": tiny},
                                            seed=seed)


GGUF_BENCH_KEY = "ltxav.bench"
# random quantized blocks: a block's float16 scale, then random codes (uniform int8 for Q8_0, 4-bit codes
# less 8 for Q4_0): the scale that gives the codes' spread a standard deviation of 0.02, as the other weights
GGUF_CODE_STD = {"Q8_0": 73.9, "Q4_0": 4.61}


def write_gguf(path, layers, quant, seed=0, tiny=False):
    """A GGUF checkpoint of the same model (real key names, ComfyUI's defaults for every size but layers and
    head width, which is what ComfyUI-GGUF's loader gives ComfyUI's detection), written tensor by tensor
    (infos first) with the ``gguf`` package: each tensor typed as ComfyUI-GGUF's tools type it
    (tests/helpers/tiny_gguf.py ``tensor_type``); quantized ones are random blocks (no quantizing of 19B
    values), the others random values of std 0.02. ``tiny``: the tiny dims, with their config in the tensor
    the tests' detection shim reads (.ci/tiny_gguf_shim.py: the test venv only)."""
    import gguf
    import numpy as np
    import torch
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel

    tiny_gguf = bench_common().test_helper("tiny_gguf")
    cfg = transformer_config(layers, tiny)
    model = LTXAVModel(dtype=torch.bfloat16, device=torch.device("meta"), operations=comfy.ops.disable_weight_init,
                       **cfg)
    writer = gguf.GGUFWriter(path=None, arch="ltxv")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(GGUF_BENCH_KEY, json.dumps({"layers": layers, "quant": quant, "seed": seed, "tiny": tiny}))
    marker = np.frombuffer(json.dumps({"transformer": cfg}).encode(), dtype=np.int8).copy() if tiny else None
    if tiny:
        writer.add_tensor_info(tiny_gguf.CONFIG_KEY, marker.shape, marker.dtype, marker.nbytes)
    plan, total = [], 0
    for key, t in model.state_dict().items():
        shape = tuple(t.shape)
        kind = tiny_gguf.tensor_type(key, shape, quant)
        if kind == quant and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant]][0]:
            kind = "F16"  # rows that do not fill whole blocks, as the tools fall back
        qt = gguf.GGMLQuantizationType[kind]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        if kind == quant:  # stored as bytes: each row's blocks
            stored, dtype = (*shape[:-1], shape[-1] // block * size), np.uint8
        else:
            stored, dtype = shape, {"F32": np.float32, "F16": np.float16}[kind]
        nbytes = int(np.prod(stored)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(key, stored, np.dtype(dtype), nbytes, raw_dtype=qt)
        plan.append((shape, stored, kind, dtype, size))
        total += nbytes
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=dev).manual_seed(seed)
    t0 = time.perf_counter()
    writer.write_header_to_file(path=Path(str(path) + ".part"))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if tiny:
        writer.write_tensor_data(marker)
    for shape, stored, kind, dtype, size in plan:
        if kind == quant:
            blocks = torch.randint(0, 256, (int(np.prod(stored)) // size, size), generator=g, device=dev,
                                   dtype=torch.uint8)
            scale = torch.full((blocks.shape[0],), 0.02 / GGUF_CODE_STD[quant], dtype=torch.float16, device=dev)
            blocks[:, :2] = scale.view(torch.uint8).reshape(-1, 2)
            data = blocks.reshape(stored)
        else:
            data = torch.randn(shape, generator=g, device=dev, dtype=torch.float32).mul_(0.02)
        writer.write_tensor_data(data.cpu().numpy().astype(dtype, copy=False))
        del data
    writer.close()
    os.replace(str(path) + ".part", path)
    log.info("wrote %s: %d tensors, %.2f GB, %.1f s", path, len(plan), total / 1e9, time.perf_counter() - t0)
    return dict(tensors=len(plan), data_bytes=total, write_s=round(time.perf_counter() - t0, 1))


def checkpoint_matches(path, layers, weights, quant=None, tiny=False):
    p = Path(path)
    if not p.is_file():
        return False
    if quant:
        import gguf

        field = gguf.GGUFReader(str(p)).get_field(GGUF_BENCH_KEY)
        b = json.loads(bytes(field.parts[field.data[-1]]).decode()) if field is not None else {}
        return b.get("layers") == layers and b.get("quant") == quant and b.get("tiny", False) == tiny
    b = bench_common().checkpoint_bench_meta(p) or {}
    return b.get("layers") == layers and b.get("weights") == weights and b.get("tiny", False) == tiny


# ----------------------------------------------------------------------------- one run (child)

class DevicePeak(threading.Thread):
    """Device memory in use (cudaMemGetInfo), polled: counts what the PyTorch allocator does not
    (DynamicVRAM's weights, its cast buffers, the CUDA context)."""

    def __init__(self, torch, baseline_used, period=0.02):
        super().__init__(daemon=True)
        self.torch, self.baseline, self.period = torch, baseline_used, period
        self.peak, self.stop_flag = 0, threading.Event()

    def sample(self):
        free, total = self.torch.cuda.mem_get_info()
        self.peak = max(self.peak, total - free - self.baseline)

    def run(self):
        while not self.stop_flag.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001
                pass
            time.sleep(self.period)

    def stop(self):
        self.stop_flag.set()
        self.join(1)
        self.sample()
        return self.peak


def host_memory_record():
    """This process's RSS/PSS/USS and the machine's used memory and page cache, GiB."""
    try:
        import psutil
        m, vm = psutil.Process().memory_full_info(), psutil.virtual_memory()
    except Exception as e:  # noqa: BLE001
        return dict(error=repr(e))
    return dict(driver_rss_gib=round(m.rss / GIB, 3), driver_pss_gib=round(getattr(m, "pss", 0) / GIB, 3),
                driver_uss_gib=round(m.uss / GIB, 3), machine_used_gib=round(vm.used / GIB, 3),
                machine_cached_gib=round(getattr(vm, "cached", 0) / GIB, 3))


def rss_gb():
    try:
        import psutil
        return round(psutil.Process().memory_info().rss / GIB, 3)
    except ImportError:
        return None


def child(a):
    """One length, one variant, in this process. Returns the run record."""
    rec = dict(kind="run", frames=a.frames_one, variant=a.variant, layers=a.layers, weights=a.gguf or a.weights,
               gguf=a.gguf, tiny=a.tiny,
               steps=a.steps, res=a.res, card_gb=a.card_gb, dynamic_vram=not a.legacy, cfg=a.cfg, guider=a.guider,
               gpus=a.gpus if a.variant.startswith("parallel") else 1, cfg_parallel=a.cfg_parallel)
    # --- ComfyUI started as its main.py starts it (the pack's comfy_host, as in its workers): its flags,
    # cuda_malloc and comfy-aimdo before torch touches CUDA; then the emulated card, and DynamicVRAM ---
    import_pack_modules()
    from ltxav_pack import comfy_host
    flags = {**({"disable_dynamic_vram": True} if a.legacy else {}),
             **({"disable_cuda_malloc": True} if a.no_cuda_malloc else {})}
    dynamic = comfy_host.prepare(str(Path(a.comfy).resolve()), flags, cuda_malloc=True)
    rec["pytorch_cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    import torch
    cuda = torch.cuda.is_available()
    dummy = None
    baseline_used = 0
    parallel = a.variant.startswith("parallel")
    from ltxav_pack import driver, envs
    per_gpu = envs.workers_per_gpu() if parallel else 1
    # the node's own rule: sampling in this process, or on workers
    here = parallel and driver.plan.one_gpu_here(
        driver.plan.ParallelSettings(gpus=a.gpus, cfg_parallel=a.cfg_parallel), not cuda,
        torch.cuda.device_count() if cuda else 0)
    workers = parallel and not here
    rec["in_comfyui_process"] = here
    if cuda:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        card = int(a.card_gb * GIB) or total  # 0: the whole card
        if workers and card < total:  # the worker holds the rest of the card (LTXAV_PARALLEL_MEMORY_CAP_GIB)
            os.environ["LTXAV_PARALLEL_MEMORY_CAP_GIB"] = f"{card / GIB:.6f}"
        elif card < total:
            dummy = comfy_host.hold_card(card)
        free2, _ = torch.cuda.mem_get_info()
        baseline_used = total - free2  # CUDA context + dummy: the device peak is counted above this
        rec["workers_per_gpu"] = per_gpu
        if workers and card < total:
            baseline_used += max(0, total - per_gpu * card)  # the workers' held tensors
        rec.update(card_total_bytes=total, dummy_bytes=dummy.numel() if dummy is not None else 0,
                   free_after_dummy_bytes=free2, context_bytes_before_dummy=total - free)
        torch.cuda.reset_peak_memory_stats()
        torch_alloc_base = torch.cuda.memory_allocated()
    comfy_host.start(dynamic)
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.utils
    rec["aimdo_enabled"] = bool(comfy.memory_management.aimdo_enabled)
    dev = mm.get_torch_device()
    rec["comfy_total_vram_gb"] = round(mm.total_vram / 1024, 3)
    rec["comfy_free_at_start_gb"] = round(mm.get_free_memory(dev) / GIB, 3)
    rec["vram_state"] = str(mm.vram_state)
    import comfy.sd
    import comfy.sample
    import comfy.samplers
    import comfy.nested_tensor

    t0 = time.perf_counter()
    model = load_gguf(a) if a.gguf else comfy.sd.load_diffusion_model(a.ckpt)
    rec["load_s"] = round(time.perf_counter() - t0, 2)
    rec["patcher"] = type(model).__name__
    rec["weight_dtype"] = str(model.model.get_dtype())
    rec["manual_cast_dtype"] = str(model.model.manual_cast_dtype)
    rec["model_size_gb"] = round(model.model_size() / GIB, 3)

    if a.variant in ("ffn-chunker", "parallel-chunker"):
        rec["chunker_path"] = apply_chunker(model, rec)
        model = rec.pop("_model")

    w, h = (int(v) for v in a.res.split("x"))
    frames = a.frames_one
    fl = (frames - 1) // 8 + 1
    t_audio = math.ceil(frames / 25.0 * 25.0)  # LTXVEmptyLatentAudio: ceil(frames / fps * latents_per_second)
    video = torch.zeros(1, 128, fl, h // 32, w // 32)
    audio = torch.zeros(1, 8, t_audio, 16)
    latent = comfy.nested_tensor.NestedTensor((video, audio))
    rec.update(latent_frames=fl, video_tokens=fl * (h // 32) * (w // 32), audio_tokens=t_audio)
    g = torch.Generator().manual_seed(1)
    caption = transformer_config(a.layers, a.tiny)["caption_channels"]
    pos = [[torch.randn(1, a.ctx_len, caption, generator=g),
            {"pooled_output": None, "unprocessed_ltxav_embeds": True, "frame_rate": 25.0}]]
    neg = [[torch.randn(1, a.ctx_len, caption, generator=g),
            {"pooled_output": None, "unprocessed_ltxav_embeds": True, "frame_rate": 25.0}]]
    noise = comfy.sample.prepare_noise(latent, 0)

    forwards, loaded = [], []

    def timed(executor, *args_, **kw):
        if cuda:
            torch.cuda.synchronize()
        s = time.perf_counter()
        out = executor(*args_, **kw)
        if cuda:
            torch.cuda.synchronize()
        forwards.append(time.perf_counter() - s)
        try:
            loaded.append(int(model.loaded_size()))
        except Exception as e:  # noqa: BLE001
            loaded.append(repr(e))
        return out

    from comfy.patcher_extension import WrappersMP
    if not workers:  # stock, and the node's path in this process; the workers time their steps themselves
        model = model.clone()
        model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "bench_timer", timed)

    step_marks = []  # the end of each step, as the parallel workers mark theirs (callback to callback)

    def mark_step(*_):
        step_marks.append(time.perf_counter())

    if cuda:  # what the variants start sampling from (the same, unless something differs before sampling)
        rec["at_sampling_start"] = {
            "weights_on_gpu_gb": round(model.loaded_size() / GIB, 3),
            "torch_allocated_gb": round((torch.cuda.memory_allocated() - torch_alloc_base) / GIB, 3),
            "device_free_gb": round(torch.cuda.mem_get_info()[0] / GIB, 3),
            "aimdo_total_vram_usage_gb": comfy_host.aimdo_usage_gib()}
    peak = DevicePeak(torch, baseline_used) if cuda else None
    if peak:
        peak.start()
    snapshot = os.environ.get("BENCH_MEMORY_SNAPSHOT") if cuda else None
    at_oom = []
    if snapshot:  # where each live block was allocated, for the tensors alive at the end or at an OOM
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=1)
        torch._C._cuda_attach_out_of_memory_observer(
            lambda *_: at_oom.append(live_blocks(torch.cuda.memory._snapshot())) if not at_oom else None)
    oom = False
    t0 = time.perf_counter()
    step_marks.append(t0)
    try:
        if parallel:
            out = parallel_sample(a, model, noise, latent, pos, neg, rec)
        elif a.guider == "cfg":
            out = cfg_guider(model, pos, neg, a.cfg).sample(noise, latent, comfy.samplers.sampler_object("euler"),
                                                            sigmas(model, a.steps), seed=0, disable_pbar=True,
                                                            callback=mark_step)
        else:
            out = comfy.sample.sample(model, noise, a.steps, a.cfg, "euler", "simple", pos, neg, latent,
                                      denoise=1.0, seed=0, disable_pbar=True, callback=mark_step)
        finite = all(bool(torch.isfinite(t).all()) for t in (out.unbind() if out.is_nested else [out]))
        if a.save_out:  # for the parent's comparison of the variants' latents
            torch.save([t.float().cpu() for t in (out.unbind() if out.is_nested else [out])], a.save_out)
        rec["finite"] = finite
    except Exception as e:  # noqa: BLE001
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() or isinstance(e, mm.OOM_EXCEPTION)
        rec["error"] = f"{type(e).__name__}: {str(e)[:800]}"  # the node's message ends with the plan
        import traceback
        rec["traceback"] = traceback.format_exc()[-2000:]  # for an OOM: where it ran out
    if snapshot:
        rec["live_blocks"] = at_oom[0] if at_oom else live_blocks(torch.cuda.memory._snapshot())
        rec["live_blocks_at"] = "out of memory" if at_oom else "end"
        torch.cuda.memory._record_memory_history(enabled=None)
    rec["sample_s"] = round(time.perf_counter() - t0, 2)
    rec["oom"] = oom
    rec["ok"] = "error" not in rec
    rec["forward_s"] = [round(x, 3) for x in forwards]
    steps = [b - a_ for a_, b in zip(step_marks[:-1], step_marks[1:])]
    # as the workers' median step (driver.report.step_timings): steps 2.. (the first also pages weights in)
    rec["s_per_step_callbacks"] = round(statistics.median(steps[1:]), 4) if len(steps) > 1 else None
    rec["s_per_step_median"] = round(statistics.median(forwards), 3) if forwards else None
    # the first forward also pulls the weights in (DynamicVRAM faults them onto the GPU on first use)
    rec["s_per_step_after_first"] = round(statistics.median(forwards[1:]), 3) if len(forwards) > 1 else None
    rec["weights_on_gpu_gb_per_forward"] = [round(x / GIB, 3) if isinstance(x, int) else x for x in loaded]
    if cuda:
        rec["device_peak_used_gb"] = round(peak.stop() / GIB, 3)
        rec["torch_max_allocated_gb"] = round((torch.cuda.max_memory_allocated() - torch_alloc_base) / GIB, 3)
        rec["torch_max_reserved_gb"] = round((torch.cuda.max_memory_reserved() - torch_alloc_base) / GIB, 3)
        rec["torch_max_allocated_note"] = "dummy subtracted"
        try:
            rec["weights_on_gpu_gb_after"] = round(model.loaded_size() / GIB, 3)
        except Exception as e:  # noqa: BLE001
            rec["weights_on_gpu_gb_after"] = repr(e)
        rec["aimdo_total_vram_usage_gb"] = comfy_host.aimdo_usage_gib()
    rec["host_rss_gb"] = rss_gb()
    rec["host_at_end"] = host_memory_record()
    rec["host_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 3)
    del dummy
    return rec


def live_blocks(snap, frames=8, most=40):
    """The PyTorch allocator's live blocks in a memory snapshot, summed by where they were allocated (the
    innermost python frames outside torch, file:line function), largest sums first."""
    sums = {}
    for seg in snap.get("segments", []):
        for blk in seg.get("blocks", []):
            if blk.get("state") != "active_allocated":
                continue
            stack = " | ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in blk.get("frames", [])
                               if f.get("filename", "").endswith(".py") and "/torch/" not in f["filename"])
            stack = " | ".join(stack.split(" | ")[:frames])
            n, size = sums.get(stack, (0, 0))
            sums[stack] = (n + 1, size + blk.get("size", 0))
    rows = sorted(sums.items(), key=lambda kv: -kv[1][1])[:most]
    return [{"gib": round(size / GIB, 3), "blocks": n, "stack": stack.split(" | ")} for stack, (n, size) in rows]


def load_gguf(a):
    """ComfyUI-GGUF's UnetLoaderGGUF on --ckpt, the pack (--gguf-pack) loaded as ComfyUI loads custom nodes."""
    import asyncio
    import importlib.util

    if importlib.util.find_spec("av") is None:
        raise RuntimeError("ComfyUI-GGUF imports ComfyUI's nodes module, which needs PyAV (av): install or carry it")
    import folder_paths
    import nodes

    pack = Path(a.gguf_pack).resolve()
    name = str(pack).replace(".", "_x_")  # the module name ComfyUI gives a custom node folder
    if name not in sys.modules and not asyncio.run(nodes.load_custom_node(str(pack))):
        raise RuntimeError(f"ComfyUI could not load {pack}")
    folder_paths.add_model_folder_path("diffusion_models", str(Path(a.ckpt).resolve().parent), is_default=True)
    return sys.modules[f"{name}.nodes"].UnetLoaderGGUF().load_unet(Path(a.ckpt).name)[0]


def cfg_guider(model, pos, neg, cfg):
    """ComfyUI's CFGGuider, as the CFGGuider node builds it."""
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(cfg)
    return g


def sigmas(model, steps):
    """The simple scheduler's sigmas, as KSampler makes them."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()


def parallel_sample(a, model, noise, latent, pos, neg, rec):
    """The parallel sampler nodes' path (``driver.POOL.run`` with the job their execute builds:
    KSampler's, or with --guider cfg a CFGGuider's): --gpus Ray workers, which load the checkpoint
    themselves, with DynamicVRAM when this process runs it; each holds the rest of its card
    (LTXAV_PARALLEL_MEMORY_CAP_GIB)."""
    import_pack_modules()
    import dataclasses

    import comfy.samplers
    from ltxav_pack import driver, jobs

    if a.guider == "cfg":
        job = jobs.GuiderJob(noise=noise, latent=latent, noise_mask=None, seed=0, guider=cfg_guider(model, pos, neg, a.cfg),
                             sampler=comfy.samplers.sampler_object("euler"), sigmas=sigmas(model, a.steps))
    else:
        job = jobs.KSamplerJob(noise=noise, latent=latent, noise_mask=None, seed=0, steps=a.steps, cfg=a.cfg,
                               sampler_name="euler", scheduler="simple", positive=pos, negative=neg)
    settings = driver.ParallelSettings(gpus=a.gpus, cfg_parallel=a.cfg_parallel)
    res = driver.POOL.run(model, job, settings)
    rec["timings"] = res.timings
    rec["worker_memory"] = [dataclasses.asdict(m) for m in res.memory]
    rec["summary_text"] = res.summary
    rec["planned_peak_gib"] = res.planned_peak_gib
    rec["planned_parts_gib"] = res.planned_parts_gib
    rec["worker_passes"] = res.passes
    group = driver.POOL.group
    rec["degrees"] = group.degrees.describe() if group else "in ComfyUI's process"
    rec["host_after_sampling"] = host_memory_record()
    rec["s_per_step_worker"] = res.timings.get("worker_s_per_step")
    driver.POOL.stop_group()
    return res.samples


def bench_common():
    """bench/common.py, imported when needed (it imports torch only inside its functions)."""
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common

    return common


def import_pack_modules():
    """The pack as the package ``ltxav_pack`` (its __init__ not run: node registration needs PyAV), once."""
    if "ltxav_pack" not in sys.modules:
        bench_common().import_pack()


def apply_chunker(model, rec):
    """The pack's LTX FFN Chunker node (auto=True), imported as a package; when its node module
    cannot be imported (comfy_api needs PyAV), the function its execute calls (``apply_ffn_chunking``)."""
    import_pack_modules()
    try:
        from ltxav_pack import nodes_ltx_ffn_chunker
        out = nodes_ltx_ffn_chunker.LTXFFNChunker.execute(model, True, 1)
        rec["_model"] = out.result[0] if hasattr(out, "result") else out[0]
        return "node"
    except ImportError as e:
        log.warning("node module not importable (%s): the node's apply_ffn_chunking without it", e)
        rec["chunker_import_error"] = str(e)[:200]
    from ltxav_pack import ffn_chunking
    rec["_model"] = ffn_chunking.apply_ffn_chunking(model, ffn_chunking.ChunkSettings(1, True))
    return "ffn_chunking.apply_ffn_chunking"


# ----------------------------------------------------------------------------- driver (parent)

def run_child(a, variant, frames, argv_base):
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as tf:
        res_path = tf.name
    cmd = [sys.executable, __file__, *argv_base, "--child", "--variant", variant, "--frames-one", str(frames),
           "--child-out", res_path, "--save-out", os.path.join(a.latents, f"{variant}-{frames}.pt")]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, timeout=a.timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = round(time.perf_counter() - t0, 1)
    try:
        rec = json.loads(Path(res_path).read_text())
    except (OSError, ValueError):
        rec = dict(kind="run", frames=frames, variant=variant, ok=False, oom=False, error=f"child rc={rc}, no record")
    Path(res_path).unlink(missing_ok=True)
    rec.update(child_rc=rc, child_wall_s=wall)
    return rec


def compare_latents(folder, variants, frames):
    """Relative L2 of each parallel variant's latents (video, audio) against the stock variant's on the
    same length: ``parallel`` against ``stock``, ``parallel-chunker`` against ``ffn-chunker``."""
    import torch

    rel_l2 = bench_common().rel_l2
    out = {}
    for variant in variants:
        anchor = {"parallel": "stock", "parallel-chunker": "ffn-chunker"}.get(variant)
        for f in frames:
            got, want = Path(folder, f"{variant}-{f}.pt"), Path(folder, f"{anchor}-{f}.pt")
            if anchor and got.exists() and want.exists():
                pairs = zip(torch.load(got), torch.load(want))
                out[f"{variant}-{f}"] = [round(rel_l2(g, w), 6) for g, w in pairs]
    return out


def device_name():
    try:
        import torch
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "?"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/opt/ComfyUI"), help="ComfyUI host folder")
    p.add_argument("--ckpt", default=None, help="default /tmp/ltx2_bench.safetensors, with --gguf "
                   "/tmp/ltx2_bench_QUANT.gguf")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--weights", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--gguf", choices=["Q8_0", "Q4_0"], default=None,
                   help="a GGUF checkpoint in this quantization, loaded with ComfyUI-GGUF's UnetLoaderGGUF")
    p.add_argument("--gguf-pack", default=None, help="the ComfyUI-GGUF folder (default: COMFY/custom_nodes/ComfyUI-GGUF)")
    p.add_argument("--tiny", action="store_true", help="tiny dims, for a CPU smoke run (with --gguf: in the test "
                   "venv, whose shim hands ComfyUI's detection the tiny config)")
    p.add_argument("--card-gb", type=float, default=24.0, help="emulated card size, GiB (0: the whole card)")
    p.add_argument("--frames", default="897,1329,2577")
    p.add_argument("--variants", default="stock",
                   help="comma list of stock, ffn-chunker, parallel, parallel-chunker (the parallel sampler at gpus=1)")
    p.add_argument("--ffn-chunker", action="store_true", help="same as --variants ffn-chunker")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--res", default="768x512")
    p.add_argument("--ctx-len", type=int, default=1024)
    p.add_argument("--legacy", action="store_true", help="no DynamicVRAM: ComfyUI's legacy ModelPatcher")
    p.add_argument("--no-cuda-malloc", action="store_true", help="ComfyUI's --disable-cuda-malloc")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (other than 1: two passes a step)")
    p.add_argument("--guider", choices=["ksampler", "cfg"], default="ksampler",
                   help="KSampler's comfy.sample.sample, or a CFGGuider (SamplerCustomAdvanced's path)")
    p.add_argument("--gpus", type=int, default=1, help="parallel variants: Ray workers, one per GPU (1: none, the node samples in this process)")
    p.add_argument("--cfg-parallel", choices=["auto", "on", "off"], default="auto",
                   help="parallel variants: the nodes' cfg_parallel input")
    p.add_argument("--timeout", type=float, default=300, help="seconds per length (subprocess)")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None, help="JSON lines file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="stock", help=argparse.SUPPRESS)
    p.add_argument("--frames-one", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.ckpt = a.ckpt or (f"/tmp/ltx2_bench_{a.gguf}.gguf" if a.gguf else "/tmp/ltx2_bench.safetensors")
    a.gguf_pack = a.gguf_pack or str(Path(a.comfy) / "custom_nodes" / "ComfyUI-GGUF")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {'child' if a.child else 'main'} %(name)s: %(message)s",
                        stream=sys.stderr)

    if a.child:
        try:
            rec = child(a)
        except Exception as e:  # noqa: BLE001 (a failure before sampling: still a record)
            import traceback
            rec = dict(kind="run", frames=a.frames_one, variant=a.variant, ok=False, oom="out of memory" in str(e).lower(),
                       error=f"{type(e).__name__}: {str(e)[:400]}", traceback=traceback.format_exc()[-2000:])
        Path(a.child_out).write_text(json.dumps(rec))
        log.info("run %s", json.dumps({k: v for k, v in rec.items() if k != "traceback"}))
        return 0

    variants = ["ffn-chunker"] if a.ffn_chunker else [v.strip() for v in a.variants.split(",") if v.strip()]
    frames = sorted(int(f) for f in a.frames.split(",") if f.strip())
    command = " ".join(["python", "bench/comfy_long_video.py", *(argv if argv is not None else sys.argv[1:])])
    commit = a.commit
    if commit is None and (ROOT / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    emit = bench_common().JsonLines(a.out, log)
    a.latents = tempfile.mkdtemp(prefix="comfy_long_video-")  # each run's latents, for rel_l2_vs_stock

    sys.path.insert(0, str(Path(a.comfy).resolve()))
    ck = None
    kind = a.gguf or a.weights
    if checkpoint_matches(a.ckpt, a.layers, a.weights, a.gguf, a.tiny):
        log.info("checkpoint %s already written (%d layers, %s)", a.ckpt, a.layers, kind)
    else:
        write = f"b.write_gguf({a.ckpt!r}, {a.layers}, {a.gguf!r}, tiny={a.tiny})" if a.gguf else \
            f"b.write_checkpoint({a.ckpt!r}, {a.layers}, {a.weights!r}, tiny={a.tiny})"
        # in a subprocess, so its CUDA context (random weights drawn on the GPU) is gone before the runs
        r = subprocess.run([sys.executable, "-c",
                            "import sys, json, logging; logging.basicConfig(level=logging.INFO); "
                            f"sys.path.insert(0, {str(Path(a.comfy).resolve())!r}); sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                            "import comfy_long_video as b; "
                            f"print(json.dumps({write}))"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            log.error("checkpoint write failed:\n%s", r.stderr[-3000:])
            emit(dict(kind="checkpoint", ok=False, error=r.stderr[-1000:]))
            return 1
        ck = json.loads(r.stdout.strip().splitlines()[-1])
        emit(dict(kind="checkpoint", ok=True, path=a.ckpt, layers=a.layers, weights=kind,
                  bytes=os.path.getsize(a.ckpt), **ck))

    argv_base = ["--comfy", a.comfy, "--ckpt", a.ckpt, "--layers", str(a.layers), "--weights", a.weights,
                 *(["--gguf", a.gguf, "--gguf-pack", a.gguf_pack] if a.gguf else []), *(["--tiny"] if a.tiny else []),
                 "--card-gb", str(a.card_gb), "--steps", str(a.steps), "--res", a.res, "--ctx-len", str(a.ctx_len),
                 "--cfg", str(a.cfg), "--guider", a.guider, "--gpus", str(a.gpus), "--cfg-parallel", a.cfg_parallel]
    if a.legacy:
        argv_base.append("--legacy")
    if a.no_cuda_malloc:
        argv_base.append("--no-cuda-malloc")
    longest = {}
    for variant in variants:
        longest[variant] = None
        for f in frames:
            rec = run_child(a, variant, f, argv_base)
            rec.update(commit=commit)
            emit(rec)
            if not rec.get("ok"):
                log.info("%s: stops at %d frames (%s)", variant, f, "OOM" if rec.get("oom") else rec.get("error"))
                break
            longest[variant] = f
    summary = dict(kind="summary", command=command, card=device_name(), emulated_card_gib=a.card_gb,
                   rel_l2_vs_stock=compare_latents(a.latents, variants, frames),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   commit=commit, comfyui=str(a.comfy), python=platform.python_version(),
                   longest_ok_frames=longest, frames_tried=frames)
    try:
        import torch
        summary["torch"] = torch.__version__
    except ImportError:
        pass
    emit(summary)
    log.info("command: %s | card: %s | date: %s | commit: %s", command, summary["card"], summary["date"], commit)
    emit.close()
    shutil.rmtree(a.latents, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
