"""The LTX-2.3 templates' two-stage workflow with a LoRA, stage by stage: stock ComfyUI against the pack's
sampler at gpus=1 and with two workers sharing the GPU, before and after the LoRA identity fix.

The workflow is ComfyUI's video_ltx2_3_t2v as the pack's parallel version runs it, on random weights at
LTX-2.3's dims: the diffusion model (``--layers``, fp8 or bf16 block weights) with a rank-``--rank`` LoRA
on every linear of its blocks at strength 0.5 (LoraLoaderModelOnly, under torch.inference_mode() as
ComfyUI runs nodes), Gemma-free conditioning; stage 1 at half the size, CFGGuider at cfg 1 with
euler_ancestral_cfg_pp on the template's 8 manual sigmas; the video latent upsampled x2 (nearest: the
latent upsampler model is not what is measured); stage 2 at full size, euler_cfg_pp on 0.85, 0.725,
0.4219, 0. ``--prompts`` runs it again with another seed (ComfyUI keeps the loaders' outputs, so the
same MODEL and LoRA tensors come back). The pack's variants add the LTX FFN Chunker (auto), as the
parallel templates do.

Variants, each in a fresh process: ``stock`` (SamplerCustomAdvanced's path: ``guider.sample``),
``gpus1`` (the node's ``POOL.run`` with gpus=1: in this process on one GPU; one CPU worker on CPU),
``shared2`` (gpus=2 with ``LTXAV_PARALLEL_WORKERS_PER_GPU=2``: two workers on the one GPU; two CPU workers
on CPU). ``--before-fix``: the pack's variants with the LoRA identity as it was (a tensor's version
counter, which tensors made under inference mode lack: every call got a new model key, so the workers
re-applied the LoRA at every stage, and the driver pickled and sent it every time).

Usage: python bench/two_stage_lora.py [--comfy PATH] [--tiny] [--layers 48] [--weights fp8|bf16]
          [--rank 64] [--res 1280x704] [--frames 121] [--prompts 2] [--variants stock,gpus1,shared2]
          [--before-fix] [--ckpt PATH] [--lora PATH] [--commit SHA] [--out results.jsonl]
``--tiny``: 2 layers (unless --layers) at toy dims, 256x192, 25 frames, rank 4: a CPU smoke run.
Writes JSON lines: one record per stage (seconds, what the workers did with the model, the node's
summary), then a summary record (command, card, date, commit).
"""
import argparse
import datetime
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("two_stage_lora")
ROOT = Path(__file__).resolve().parent.parent
STAGE1_SIGMAS = "1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0"
STAGE2_SIGMAS = "0.85, 0.7250, 0.4219, 0.0"
LTX23_OPTIONS = dict(apply_gated_attention=True, cross_attention_adaln=True, caption_proj_before_connector=True,
                     caption_projection_first_linear=False, connector_apply_gated_attention=True)
# LTX-2.3's connectors as wide as their streams (video 32 x 128, audio 32 x 64); the tiny ones likewise
REAL_CONNECTORS = dict(connector_num_attention_heads=32, connector_attention_head_dim=128,
                       audio_connector_num_attention_heads=32, audio_connector_attention_head_dim=64)
TINY_CONNECTORS = dict(connector_num_attention_heads=4, connector_attention_head_dim=8,
                       audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=4)
VARIANTS = ("stock", "gpus1", "shared2")


def transformer_config(common, layers, tiny):
    dims = common.TINY_DIMS if tiny else common.LTX2_DIMS
    return {**dims, **LTX23_OPTIONS, **(TINY_CONNECTORS if tiny else REAL_CONNECTORS), "rope_type": "split",
            "frequencies_precision": "float64", "num_layers": layers}


def write_lora(ckpt, path, rank, seed=0):
    """A rank-``rank`` LoRA (lora_up / lora_down) on every linear weight of the checkpoint's blocks."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    lora = {}
    with safe_open(str(ckpt), "pt") as f:
        for key in f.keys():
            if ".transformer_blocks." in key and key.endswith(".weight") and len(f.get_slice(key).get_shape()) == 2:
                out_dim, in_dim = f.get_slice(key).get_shape()
                name = key.removeprefix("model.").removesuffix(".weight")
                lora[f"{name}.lora_up.weight"] = (torch.randn(out_dim, rank, generator=g) * 0.01).to(torch.bfloat16)
                lora[f"{name}.lora_down.weight"] = (torch.randn(rank, in_dim, generator=g) * 0.01).to(torch.bfloat16)
    save_file(lora, str(path))
    return dict(lora_tensors=len(lora), lora_bytes=os.path.getsize(path))


# ----------------------------------------------------------------------------- one variant (child)

def child(a):
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    common.import_pack()
    from ltxav_pack import comfy_host

    # ComfyUI as its main.py starts it (the pack's comfy_host): its defaults (no argument parsing), the CUDA
    # allocator and comfy-aimdo before torch touches CUDA, then the device and DynamicVRAM
    dynamic = comfy_host.prepare(str(Path(a.comfy).resolve()), cuda_malloc=True)
    if a.variant == "shared2":
        os.environ["LTXAV_PARALLEL_WORKERS_PER_GPU"] = "2"
    import torch

    cuda = torch.cuda.is_available()
    comfy_host.start(dynamic)
    import comfy.memory_management
    import comfy.nested_tensor
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    from ltxav_pack import content_keys, driver, jobs

    if a.before_fix:  # the LoRA identity before the fix: the version counter, which inference tensors lack
        content_keys._cache_state = lambda t, plain: (t._version, t.data_ptr())
    recs = []
    with torch.inference_mode():  # as ComfyUI runs every node
        t0 = time.perf_counter()
        model = comfy.sd.load_diffusion_model(a.ckpt)
        lora = comfy.utils.load_torch_file(a.lora, safe_load=True)
        model = comfy.sd.load_lora_for_models(model, None, lora, 0.5, 0)[0]  # LoraLoaderModelOnly
        load_s = time.perf_counter() - t0
        if a.variant != "stock":  # the parallel templates' LTX FFN Chunker (auto)
            from ltxav_pack import ffn_chunking

            common.chunk_ffn(model, "auto")
            assert ffn_chunking.ChunkSettings.from_options(model.model_options["transformer_options"])
        width, height = (int(v) for v in a.res.split("x"))
        dims = transformer_config(common, a.layers, a.tiny)
        cond_width = dims["cross_attention_dim"] + dims["audio_cross_attention_dim"]  # LTX-2.3: both streams' text

        def cond(seed):
            return [[torch.randn(1, 128, cond_width, generator=torch.Generator().manual_seed(seed)),
                     {"pooled_output": None, "unprocessed_ltxav_embeds": True, "frame_rate": 25.0}]]

        pos, neg = cond(1), cond(2)
        fl = (a.frames - 1) // 8 + 1
        audio = torch.zeros(1, 8, math.ceil(a.frames / 25 * 25), 16)
        settings = driver.ParallelSettings(gpus=1 if a.variant == "gpus1" else 2)

        def stage(prompt, index, latent, sampler_name, sigmas_text):
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(pos, neg)
            guider.set_cfg(1.0)
            sampler = comfy.samplers.sampler_object(sampler_name)
            sigmas = torch.tensor([float(x) for x in sigmas_text.split(",")])
            noise = Noise_RandomNoise(prompt * 100 + index)
            rec = dict(kind="stage", variant=a.variant, before_fix=a.before_fix, prompt=prompt, stage=index,
                       steps=len(sigmas) - 1, video_latent=list(latent.unbind()[0].shape))
            common.sync()
            t = time.perf_counter()
            if a.variant == "stock":
                out = guider.sample(noise.generate_noise({"samples": latent}), latent, sampler, sigmas,
                                    disable_pbar=True, seed=noise.seed)
            else:
                job = jobs.GuiderJob(noise=noise.generate_noise({"samples": latent}), latent=latent, noise_mask=None,
                                     seed=noise.seed, guider=guider, sampler=sampler, sigmas=sigmas)
                if a.profile and (prompt, index) == (0, 2):  # where the driver's time goes (the log, top 40)
                    import cProfile
                    import io
                    import pstats

                    prof = cProfile.Profile()
                    res = prof.runcall(driver.POOL.run, model, job, settings)
                    text = io.StringIO()
                    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
                    log.info("profile of prompt 0, stage 2 (%s):\n%s", a.variant, text.getvalue())
                else:
                    res = driver.POOL.run(model, job, settings)
                out = res.samples
                rec.update(model_load=res.model_load and res.model_load.action, timings=res.timings,
                           worker_passes=res.passes, counted_passes=res.counted_passes, summary=res.summary)
            common.sync()
            rec["seconds"] = round(time.perf_counter() - t, 3)
            log.info("%s", json.dumps(rec))
            recs.append(rec)
            return out

        for prompt in range(a.prompts):
            video = torch.zeros(1, 128, fl, height // 64, width // 64)
            out = stage(prompt, 1, comfy.nested_tensor.NestedTensor((video, audio)), "euler_ancestral_cfg_pp",
                        STAGE1_SIGMAS)
            v, aud = out.unbind()
            v = torch.nn.functional.interpolate(v, scale_factor=(1, 2, 2), mode="nearest")
            stage(prompt, 2, comfy.nested_tensor.NestedTensor((v, aud)), "euler_cfg_pp", STAGE2_SIGMAS)
    driver.POOL.shutdown("benchmark done")
    return dict(kind="variant", variant=a.variant, before_fix=a.before_fix, load_s=round(load_s, 2), cuda=cuda,
                dynamic_vram=bool(comfy.memory_management.aimdo_enabled), stages=recs)


# ----------------------------------------------------------------------------- driver (parent)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", "/opt/ComfyUI"), help="ComfyUI host folder")
    p.add_argument("--tiny", action="store_true", help="2 layers at toy dims, small clip: a CPU smoke run")
    p.add_argument("--layers", type=int, default=None, help="default 48 (--tiny: 2)")
    p.add_argument("--weights", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--rank", type=int, default=None, help="default 64 (--tiny: 4)")
    p.add_argument("--res", default="1280x704", help="stage 2's size; stage 1 runs at half of it")
    p.add_argument("--frames", type=int, default=121)
    p.add_argument("--prompts", type=int, default=2, help="runs of the two stages (another seed each)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--before-fix", action="store_true",
                   help="the pack's variants with the LoRA identity before the fix")
    p.add_argument("--ckpt", default=None, help="checkpoint path (written when missing or of other settings)")
    p.add_argument("--lora", default=None)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per variant")
    p.add_argument("--profile", action="store_true", help="log a profile of the node's call at prompt 0, stage 2")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None, help="JSON lines file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="stock", help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    who = "child" if a.child else "main"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {who} %(name)s: %(message)s", stream=sys.stderr)
    # --tiny: 2 layers, rank 4 unless given (--tiny --layers 48: the real count of LoRA patches at toy dims)
    a.layers = a.layers or (2 if a.tiny else 48)
    a.rank = a.rank or (4 if a.tiny else 64)
    if a.tiny:
        if a.res == p.get_default("res"):
            a.res = "256x192"
        if a.frames == p.get_default("frames"):
            a.frames = 25
    tag = f"{'tiny' if a.tiny else 'ltx23'}-{a.layers}-{a.weights}"
    a.ckpt = a.ckpt or str(Path(tempfile.gettempdir()) / f"two_stage_lora-{tag}.safetensors")
    a.lora = a.lora or str(Path(tempfile.gettempdir()) / f"two_stage_lora-{tag}-rank{a.rank}.safetensors")
    if a.child:
        Path(a.child_out).write_text(json.dumps(child(a)))
        return 0

    sys.path.insert(0, str(ROOT / "bench"))
    import common

    emit = common.JsonLines(a.out, log)

    command = " ".join(["python", "bench/two_stage_lora.py", *(argv if argv is not None else sys.argv[1:])])
    commit = a.commit or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                        text=True).stdout.strip() or None
    meta = {"layers": a.layers, "weights": a.weights, "tiny": a.tiny, "ltx": "2.3"}
    # in a subprocess, so its CUDA context (weights drawn on the GPU) is gone before the runs
    script = ("import sys, json; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]); import common; "
              "import two_stage_lora as b; meta = json.loads(sys.argv[5]); "
              "done = common.checkpoint_bench_meta(sys.argv[3]) == meta; "
              "ck = {} if done else common.stream_checkpoint(sys.argv[3], b.transformer_config(common, meta['layers'], "
              "meta['tiny']), meta['weights'], meta, std=0.2 if meta['tiny'] else 0.02); "
              "ck.update(b.write_lora(sys.argv[3], sys.argv[4], int(sys.argv[6]))); print(json.dumps(ck))")
    r = subprocess.run([sys.executable, "-c", script, str(Path(a.comfy).resolve()), str(ROOT / "bench"), a.ckpt,
                        a.lora, json.dumps(meta), str(a.rank)], capture_output=True, text=True)
    if r.returncode:
        log.error("writing the checkpoint or the LoRA failed:\n%s", r.stderr[-3000:])
        return 1
    emit(dict(kind="files", ckpt=a.ckpt, lora=a.lora, rank=a.rank, **json.loads(r.stdout.strip().splitlines()[-1])))
    argv_base = ["--comfy", a.comfy, "--layers", str(a.layers), "--weights", a.weights, "--rank", str(a.rank),
                 "--res", a.res, "--frames", str(a.frames), "--prompts", str(a.prompts), "--ckpt", a.ckpt,
                 "--lora", a.lora] + (["--tiny"] if a.tiny else []) + (["--before-fix"] if a.before_fix else []) + (
        ["--profile"] if a.profile else [])
    for variant in [v.strip() for v in a.variants.split(",") if v.strip()]:
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
        with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as tf:
            res_path = tf.name
        t0 = time.perf_counter()
        try:
            rc = subprocess.run([sys.executable, __file__, *argv_base, "--child", "--variant", variant,
                                 "--child-out", res_path], timeout=a.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        try:
            rec = json.loads(Path(res_path).read_text())
        except (OSError, ValueError):
            rec = dict(kind="variant", variant=variant, error=f"child rc={rc}, no record")
        Path(res_path).unlink(missing_ok=True)
        rec.update(child_rc=rc, child_wall_s=round(time.perf_counter() - t0, 1), commit=commit)
        emit(rec)
    info = common.device_info()
    emit(dict(kind="summary", command=command, card=info["device"], commit=commit, torch=info["torch"],
              python=info["python"], date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))
    emit.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
