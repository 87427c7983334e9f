"""FFN-phase peak memory and forward time of ComfyUI's LTXAV model with and without the pack's
FFN chunking, at real LTX-2 dims (random weights, a few layers), through the pack's own
DIFFUSION_MODEL wrapper.

Usage: python bench/ffn_chunking.py --comfy PATH [--layers 4] [--case 897x768x512]
                                    [--chunks 1,2,4,8,16,32,auto] [--repeats 10] [--out FILE]
The FFN peak is the largest allocation above what was allocated when an ``ff`` / ``audio_ff`` call
began, over all blocks (a separate pass, synchronised around every FFN call); step time is the
median of ``--repeats`` whole forwards without any instrumentation.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def options(setting):
    """transformer_options with the pack's DIFFUSION_MODEL wrapper, chunking per ``setting``: "1" (off),
    "auto", or a chunk count."""
    import comfy.patcher_extension

    from ltxav_pack import ffn_chunking

    dmw = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    to = {"wrappers": {dmw: {"bench": [ffn_chunking.diffusion_model_wrapper]}}}
    if setting != "1":
        auto = setting == "auto"
        to[ffn_chunking.CHUNKING_KEY] = ffn_chunking.ChunkSettings(1 if auto else int(setting), auto).as_dict()
    return to


def forward(model, inputs, to):
    with torch.no_grad():
        return model(**inputs, transformer_options=to)


class FFNPeaks:
    """Forward hooks around every ff / audio_ff call: peak allocation above the call's start."""

    def __init__(self, model):
        self.cuda = torch.cuda.is_available()
        self.peaks = {"ff": 0, "audio_ff": 0}
        self.handles = []
        for block in model.transformer_blocks:
            for name in self.peaks:
                mod = getattr(block, name)
                self.handles.append(mod.register_forward_pre_hook(self.pre))
                self.handles.append(mod.register_forward_hook(self.post(name)))

    def pre(self, mod, args):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()

    def post(self, name):
        def hook(mod, args, out):
            if self.cuda:
                torch.cuda.synchronize()
                self.peaks[name] = max(self.peaks[name], torch.cuda.max_memory_allocated() - self.start)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--case", default="897x768x512")
    ap.add_argument("--chunks", default="1,2,4,8,16,32,auto")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="tiny dims, for a CPU smoke run")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    common.import_comfy(a.comfy)
    common.import_pack()
    from ltxav_pack import ffn_chunking

    cuda = torch.cuda.is_available()
    model = common.build_model(a.layers, tiny=a.tiny)
    inputs, video_tokens = common.make_inputs(model, a.case)
    weights = torch.cuda.memory_allocated() if cuda else 0

    rows = []
    for setting in a.chunks.split(","):
        to = options(setting)
        settings = ffn_chunking.ChunkSettings.from_options(to) or ffn_chunking.ChunkSettings()
        free = ffn_chunking._free_memory(inputs["x"][0].device) if settings.auto else None
        block = model.transformer_blocks[0]
        chunks = [ffn_chunking.chunks_for(settings, ff, x.new_empty((1, n, 0)), free)
                  for ff, x, n in ((block.ff, inputs["x"][0], video_tokens),
                                   (block.audio_ff, inputs["x"][1], inputs["x"][1].shape[2]))]
        hooks = FFNPeaks(model)
        forward(model, inputs, to)
        hooks.remove()
        ffn = dict(hooks.peaks)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        forward(model, inputs, to)  # warm-up, and the whole-forward peak
        common.sync()
        forward_peak = (torch.cuda.max_memory_allocated() - weights) if cuda else 0
        times = []
        for _ in range(a.repeats):
            common.sync()
            t0 = time.perf_counter()
            forward(model, inputs, to)
            common.sync()
            times.append(time.perf_counter() - t0)
        rows.append(dict(chunks=setting, video_chunks=chunks[0], audio_chunks=chunks[1],
                         ffn_video_peak_gb=round(ffn["ff"] / common.GB, 4),
                         ffn_audio_peak_gb=round(ffn["audio_ff"] / common.GB, 4),
                         forward_peak_over_weights_gb=round(forward_peak / common.GB, 3),
                         forward_s_median=round(statistics.median(times), 4),
                         forward_s=[round(t, 4) for t in times]))
        print(rows[-1], flush=True)

    base = next(r for r in rows if r["chunks"] == "1")
    for r in rows:
        r["ffn_video_peak_reduction_x"] = (round(base["ffn_video_peak_gb"] / r["ffn_video_peak_gb"], 2)
                                           if r["ffn_video_peak_gb"] else None)
        r["forward_time_vs_unchunked"] = round(r["forward_s_median"] / base["forward_s_median"], 4)
    result = dict(bench="ffn_chunking", case=a.case, layers=a.layers, video_tokens=video_tokens,
                  audio_tokens=inputs["x"][1].shape[2], dtype=str(next(model.parameters()).dtype),
                  weights_gb=round(weights / common.GB, 3), **common.device_info(),
                  command="python bench/ffn_chunking.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()
                                                                      if v not in (None, False) and k != "comfy"),
                  rows=rows)
    print(f"{'chunks':>6} {'ffn peak GB':>12} {'x less':>7} {'fwd peak GB':>12} {'fwd s':>8} {'vs 1':>6}")
    for r in rows:
        print(f"{r['chunks']:>6} {r['ffn_video_peak_gb']:>12} {r['ffn_video_peak_reduction_x']!s:>7} "
              f"{r['forward_peak_over_weights_gb']:>12} {r['forward_s_median']:>8} {r['forward_time_vs_unchunked']:>6}")
    if a.out:
        common.write_json(a.out, result)


if __name__ == "__main__":
    main()
