"""The pack's demo, step 2 of 2 (README "Try it"; run through tools/demo.sh, which finds the ComfyUI and the
Python environment tools/setup.sh made).

Makes a tiny LTX-2 and a tiny LTX-2.3 checkpoint (ComfyUI's own model classes, random weights: no
download; tools/tiny_models.py), and samples a short audio-video clip of each twice with the same seed
and inputs: with stock ComfyUI's KSampler, and with the LTXAV Parallel KSampler on several workers (2 CPU
worker processes when ComfyUI runs on the CPU, else every GPU). Prints the plan (workers, how the work is
split, the planner's memory per worker), the times and how close the two results are, by the tests' rule
(tests/helpers/numerics.py: both measured against stock run in float64; the parallel one must be as close
as stock's own rounding allows). Exit status 0 when every version matches.
"""
import argparse
import importlib
import importlib.util
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK = "ltxav_pack"  # the name the pack is imported under here (ComfyUI uses the folder's path)
NAMES = {"2": "LTX-2", "2.3": "LTX-2.3"}


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_comfy(path: str, cpu: bool):
    """ComfyUI on sys.path, as main.py sets it up for these flags (CPU when asked or without CUDA)."""
    sys.path.insert(0, path)
    import comfy.cli_args
    import torch

    if cpu or not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401


def import_pack():
    """The pack as ComfyUI loads a custom node folder (its __init__ registers the nodes)."""
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    nodes_mod = importlib.import_module(f"{PACK}.nodes_parallel_sampler")
    return nodes_mod, importlib.import_module(f"{PACK}.driver")


def show_pack_log():
    """The pack's own log lines (the workers', the plan) on stderr, indented; ComfyUI's and Ray's kept quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("    | %(message)s"))
    logger = logging.getLogger(PACK)
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False


def run(version, args, folder, nodes_mod, ps, numerics, tiny) -> bool:
    import comfy.sd
    import nodes
    import torch

    name = NAMES[version]
    path = Path(folder) / f"tiny_{name}.safetensors"
    config = tiny.write_tiny_ltxav(path, version=version)
    width = tiny.context_width(config)
    model = comfy.sd.load_diffusion_model(str(path))
    model_f64 = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float64})
    latent = tiny.make_latent(args.width, args.height, args.length)
    pos, neg = tiny.make_conditioning(width, seed=1), tiny.make_conditioning(width, seed=2)
    settings = (args.seed, args.steps, args.cfg, "euler", "simple", pos, neg)
    print(f"{name}: {args.length} frames {args.width}x{args.height} with audio, {args.steps} steps, cfg {args.cfg} "
          f"(euler, simple); tiny checkpoint {path.stat().st_size / 1e6:.1f} MB, random weights")
    t0 = time.perf_counter()
    stock = nodes.common_ksampler(model, *settings, latent)[0]
    stock_s = time.perf_counter() - t0
    reference = nodes.common_ksampler(model_f64, *settings, latent)[0]
    mode = "off" if version == "2" else "auto"  # sequence parallel; then the guidance passes on separate workers
    t0 = time.perf_counter()
    out = nodes_mod.LTXAVParallelKSampler.execute(model, *settings, latent, 1.0, args.gpus, 0, 1, "local", mode)
    parallel_s = time.perf_counter() - t0
    got = out.args[0]
    print(f"  stock KSampler: {stock_s:.1f} s; LTXAV Parallel KSampler (gpus={args.gpus}, cfg_parallel={mode}): "
          f"{parallel_s:.1f} s" + (" (with starting Ray and the workers)" if version == "2" else ""))
    for line in out.ui.value.splitlines():
        print(f"  plan and run: {line.removeprefix('LTXAV Parallel Sampler: ').strip()}")
    group = ps.POOL.group
    if group is not None:
        est = ps.plan.check_memory(model, latent["samples"], group.degrees, 1 << 50, group.infos, 2)
        print(f"  planner: {est.total / 2**20:.1f} MiB per worker at this size ({est.note})")
    ok = True
    for part, (e_got, e_stock, bound) in zip(("video", "audio"), numerics.errors(got, stock, reference)):
        match = e_got <= bound
        ok = ok and match and 0 < e_stock <= numerics.max_rel_error(torch.float32)
        print(f"  {part}: relative L2 to stock in float64: parallel {e_got:.2e}, stock {e_stock:.2e} (bound "
              f"{bound:.2e}): {'SAME as stock' if match else 'DIFFERENT'}")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI's folder (COMFYUI_PATH)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="workers: GPUs (0 = all), or CPU worker processes on the CPU (default 2 there)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with GPUs (as ComfyUI's --cpu)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--length", type=int, default=25, help="frames (8 n + 1)")
    parser.add_argument("--versions", default="2,2.3", help="LTX versions: 2, 2.3 or both")
    args = parser.parse_args()
    if not args.comfyui or not (Path(args.comfyui) / "comfy" / "ldm" / "lightricks" / "av_model.py").is_file():
        parser.error(f"no ComfyUI with LTX-2 audio-video at {args.comfyui!r}: run bash tools/setup.sh, then "
                     "bash tools/demo.sh (or pass --comfyui)")
    os.environ.setdefault("LOG_LEVEL", "warning")  # xfuser's own log
    logging.basicConfig(level=logging.WARNING)
    import_comfy(args.comfyui, args.cpu)
    import comfy.model_management as mm

    cpu = mm.cpu_state == mm.CPUState.CPU
    if args.gpus is None:
        args.gpus = 2 if cpu else 0
    nodes_mod, ps = import_pack()
    show_pack_log()
    numerics = load("ltxav_demo_numerics", ROOT / "tests" / "helpers" / "numerics.py")
    sys.path.insert(0, str(ROOT / "tools"))
    tiny = importlib.import_module("tiny_models")
    where = f"the CPU ({os.cpu_count()} cores), {args.gpus} CPU worker processes" if cpu else \
        f"{mm.get_torch_device_name(mm.get_torch_device())}, gpus={args.gpus}"
    print(f"LTXAV Parallel demo: ComfyUI at {args.comfyui}; {where}")
    ok = True
    try:
        with tempfile.TemporaryDirectory(prefix="ltxav-demo-") as folder:
            for version in args.versions.split(","):
                ok = run(version.strip(), args, folder, nodes_mod, ps, numerics, tiny) and ok
    finally:
        ps.POOL.shutdown("the demo is done")
    print("LTXAV Parallel demo: " + ("every result equals stock ComfyUI's (within its own rounding)" if ok else
                                     "a result DIFFERS from stock ComfyUI's"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
