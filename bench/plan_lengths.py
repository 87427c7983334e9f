"""The planner's longest clip per card size and GPU count: what W cards of 16 or 24 GiB are predicted to
buy, for the README's table, labelled as predictions (no several-GPU machine measured them).

LTX-2 (19B, 48 layers) at its real dims with fp8 block weights, built by ComfyUI's LTXAVModel on the meta
device with the operations ComfyUI picks for fp8 (bf16 compute), planned as the parallel samplers plan a
run: DynamicVRAM streaming the weights, the lean attention, the FFN Chunker's auto, per-token timesteps, the
sampler's state, cfg 1 (one pass a step), audio. Free memory per card: what the one-card runs measured in
ComfyUI's process on an emulated card (23.42 GiB of 24, 15.42 of 16: ComfyUI's CUDA context already out);
with W > 1, the worker on ComfyUI's card also has its own CUDA context (``CUDA_CONTEXT_BYTES``) and every
worker NCCL's buffers for W - 1 peers (``NCCL_PEER_BYTES``, from NVIDIA/nccl#1685).

Usage: python bench/plan_lengths.py --comfy PATH [--out result.jsonl]   (CPU, seconds)
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FREE_GIB = {24: 23.42, 16: 15.42}  # measured free memory of the emulated cards (bench/README.md)
SIZES = {"768x512": (768, 512), "1920x1088": (1920, 1088)}
WORLDS = (1, 2, 4, 8)


def ltx2_fp8_dims(family):
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel

    ops = comfy.ops.pick_operations(torch.float8_e4m3fn, torch.bfloat16)
    model = LTXAVModel(num_layers=48, dtype=torch.float8_e4m3fn, device="meta", operations=ops, rope_type="split",
                       frequencies_precision="float64", num_attention_heads=32, attention_head_dim=128,
                       cross_attention_dim=4096, audio_num_attention_heads=32, audio_attention_head_dim=64,
                       audio_cross_attention_dim=2048, caption_channels=3840)
    return family.plan_dims(model, compute_dtype=torch.bfloat16)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", required=True, help="the ComfyUI folder")
    ap.add_argument("--out", help="JSON lines, one per card, size and GPU count")
    a = ap.parse_args()
    common.import_comfy(a.comfy)
    common.import_pack()
    from ltxav_pack import memory_plan as mp
    from ltxav_pack.models.ltxav import LTXAV

    family = LTXAV()
    dims = ltx2_fp8_dims(family)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                            text=True).stdout.strip() or None
    rows = []
    for card, free in FREE_GIB.items():
        for size, (w, h) in SIZES.items():
            clip = family.geometry.clip(121, w, h)
            for world in WORLDS:
                budget = int(free * mp.GIB) - (mp.CUDA_CONTEXT_BYTES if world > 1 else 0)
                kw = dict(world=world, sampler=True, per_token_timesteps=True, streaming=True, lean=True,
                          lean_value=True, nccl_peers=world - 1)
                latent = mp.largest_latent_frames(budget, dims, clip, **kw)
                frames = (latent - 1) * 8 + 1 if latent else 0
                est = mp.estimate(dims, clip.with_latent_frames(latent), **kw) if latent else None
                rows.append({"kind": "prediction", "card_gib": card, "free_gib": free, "res": size, "gpus": world,
                             "frames": frames, "latent_frames": latent,
                             "planned_gib": round(est.total / mp.GIB, 2) if est else None,
                             "budget_gib": round(budget / mp.GIB, 2), "model": "LTX-2 48 layers fp8, audio, cfg 1",
                             "commit": commit, "command": " ".join(["python", *sys.argv]),
                             **common.device_info()})
                print(f"{card} GiB, {size}, gpus={world}: {frames:,} frames (plan "
                      f"{rows[-1]['planned_gib']} of {rows[-1]['budget_gib']} GiB)")
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
