"""What the benchmark scripts share (no script imports another): ComfyUI on sys.path, the pack imported
as a package, an LTXAV model at real LTX-2 dims with random weights, its checkpoint and inputs, the
relative error of a result, and the kernel-trace arithmetic of the profiles."""
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1 << 30

LTX2_DIMS = dict(num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096,
                 audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048,
                 caption_channels=3840)
TINY_DIMS = dict(num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                 audio_num_attention_heads=4, audio_attention_head_dim=4, audio_cross_attention_dim=16,
                 caption_channels=16, connector_num_attention_heads=2, connector_attention_head_dim=8)


def multicast_off():
    """NVLink multicast (NVLS) off for NCCL, PyTorch's symmetric memory and NVSHMEM, unless the environment
    already sets these variables: the benchmarks run with it off. Called first in a script's main(),
    before CUDA starts; spawned ranks and Ray workers inherit the variables."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")


def test_helper(module: str):
    """A module of tests/helpers/, loaded from its file (bench/ and tests/ are script folders, not packages
    of one import root): what the tests and benchmarks share (numerics: the relative error; tiny_gguf: the
    GGUF types ComfyUI-GGUF's tools give a checkpoint's tensors)."""
    name = f"ltxav_test_{module}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "helpers" / f"{module}.py")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        spec.loader.exec_module(loaded)
    return sys.modules[name]


def rel_l2(got, want) -> float:
    """Relative L2 error of ``got`` against ``want`` (float64 arithmetic), as the tests measure it."""
    return test_helper("numerics").rel_l2(got, want)


def import_comfy(path):
    import torch

    sys.path.insert(0, str(path))
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.ops  # noqa: F401


def import_pack(name="ltxav_pack", root=None):
    """The pack as a package, without running its __init__ (node registration needs the whole
    ComfyUI front-end stack; the benchmarks use only the pure modules). ``root``: another checkout
    of it (an older commit, to compare), else this one."""
    root = Path(root or ROOT)
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    return module


def build_model(layers, tiny=False, dtype=None, device=None, weight_dtype=None):
    """LTXAVModel with random weights. ``weight_dtype`` (e.g. torch.float8_e4m3fn) other than the
    compute ``dtype``: weights stored in it and cast per layer, with the operations ComfyUI picks
    for such a checkpoint (``comfy.ops.pick_operations``, as ``BaseModel`` does)."""
    import comfy.ops
    import torch
    from comfy.ldm.lightricks.av_model import LTXAVModel

    cuda = torch.cuda.is_available()
    device = device or torch.device("cuda" if cuda else "cpu")
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    ops = comfy.ops.disable_weight_init
    if weight_dtype is not None and weight_dtype != dtype:
        ops = comfy.ops.pick_operations(weight_dtype, dtype, load_device=None if device.type == "meta" else device)
    model = LTXAVModel(num_layers=layers, dtype=weight_dtype or dtype, device=device, operations=ops,
                       rope_type="split", frequencies_precision="float64", **(TINY_DIMS if tiny else LTX2_DIMS))
    if device.type == "meta":
        return model.eval()
    g = torch.Generator(device=device).manual_seed(0)  # the same weights in every process
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=dtype).mul_(0.02))
    return model.eval()


def make_inputs(model, case, i2v=False, seed=0, dtype=None):
    """Latents, timesteps and context for an LTX-2 `frames x width x height` clip (25 fps, audio on)."""
    import torch

    frames, w, h = (int(v) for v in case.split("x"))
    p = next(model.parameters())
    p = torch.empty(0, device=p.device, dtype=dtype or p.dtype)
    g = torch.Generator(device=p.device).manual_seed(seed)
    fl, lh, lw = (frames - 1) // 8 + 1, h // 32, w // 32
    vx = torch.randn(1, 128, fl, lh, lw, device=p.device, dtype=p.dtype, generator=g)
    ax = torch.randn(1, 8, math.ceil(frames / 25 * 25), 16, device=p.device, dtype=p.dtype, generator=g)
    ctx = torch.randn(1, 1024, 2 * model.caption_channels, device=p.device, dtype=p.dtype, generator=g)
    sigma = torch.full((1,), 0.7, device=p.device)
    kw, t = {}, sigma
    if i2v:  # first latent frame is the conditioning image: per-token timesteps
        mask = torch.ones(1, 1, fl, lh, lw, device=p.device)
        mask[:, :, 0] = 0
        kw["denoise_mask"] = mask
        t = model.patchifier.patchify((mask * sigma.view(1, 1, 1, 1, 1))[:, :1])[0]
    return dict(x=[vx, ax], timestep=(t, sigma), context=ctx, attention_mask=None, frame_rate=25, **kw), fl * lh * lw


def write_checkpoint(path, layers, tiny):
    """A safetensors checkpoint of ``build_model`` (real key names, random weights) with its config in
    the metadata (``config = {"transformer": {...}}``), which ComfyUI's loader detects as LTXAV; returns
    the config."""
    import torch
    from safetensors.torch import save_file

    model = build_model(layers, tiny=tiny)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    dims = TINY_DIMS if tiny else LTX2_DIMS
    config = {**dims, "rope_type": "split", "frequencies_precision": "float64"}
    save_file(sd, str(path), metadata={"config": json.dumps({"transformer": config})})
    del model, sd
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return config


SAFETENSORS_DTYPE = {"float8_e4m3fn": "F8_E4M3", "bfloat16": "BF16", "float32": "F32"}


def stream_checkpoint(path, transformer, weights, bench_meta, seed=0, std=0.02, prefix="model.diffusion_model."):
    """Write an LTXAV checkpoint tensor by tensor (host memory stays low; the shapes come from ComfyUI's
    LTXAVModel built on the meta device, so every key name is real): random weights (std ``std``, drawn on
    the GPU when there is one), the blocks' linear weights as fp8 e4m3 (``weights`` "fp8") or bf16, the rest
    bf16; metadata ``config = {"transformer": transformer}`` (ComfyUI detects LTXAV from it) and
    ``bench = bench_meta``. Returns the tensor count, data bytes and seconds."""
    import time

    import comfy.cli_args
    import torch

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel

    model = LTXAVModel(dtype=torch.bfloat16, device=torch.device("meta"), operations=comfy.ops.disable_weight_init,
                       **transformer)
    fp8 = weights == "fp8"

    def stored_dtype(key, t):
        if fp8 and key.startswith("transformer_blocks.") and key.endswith(".weight") and t.dim() == 2:
            return torch.float8_e4m3fn
        return torch.bfloat16

    header, offset, plan = {}, 0, []
    for key, t in model.state_dict().items():
        dt = stored_dtype(key, t)
        n = t.numel() * torch.empty((), dtype=dt).element_size()
        header[prefix + key] = {"dtype": SAFETENSORS_DTYPE[str(dt).split(".")[1]], "shape": list(t.shape),
                                "data_offsets": [offset, offset + n]}
        plan.append((prefix + key, tuple(t.shape), dt))
        offset += n
    header["__metadata__"] = {"config": json.dumps({"transformer": transformer}), "bench": json.dumps(bench_meta)}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=dev).manual_seed(seed)
    tmp = Path(str(path) + ".part")
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for _, shape, dt in plan:
            x = torch.randn(shape, generator=g, device=dev, dtype=torch.float32).mul_(std).to(dt)
            f.write(x.reshape(-1).view(torch.uint8).cpu().numpy().tobytes() if x.numel() else b"")
            del x
    os.replace(tmp, path)
    return dict(tensors=len(plan), data_bytes=offset, write_s=round(time.perf_counter() - t0, 1))


def checkpoint_bench_meta(path):
    """The ``bench`` metadata ``stream_checkpoint`` wrote into ``path`` (None when there is no such file)."""
    p = Path(path)
    if not p.is_file():
        return None
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n)).get("__metadata__", {})
    try:
        return json.loads(meta.get("bench", "{}"))
    except ValueError:
        return None


def sample_inputs(case, caption_channels):
    """What ``comfy.sample.sample`` takes for a `frames x width x height` clip with audio: an empty AV
    latent, its noise, a positive and a negative Gemma-free conditioning; and the video token count."""
    import comfy.nested_tensor
    import torch

    frames, w, h = (int(v) for v in case.split("x"))
    g = torch.Generator().manual_seed(0)
    video = torch.zeros(1, 128, (frames - 1) // 8 + 1, h // 32, w // 32)
    audio = torch.zeros(1, 8, math.ceil(frames / 25 * 25), 16)
    latent = comfy.nested_tensor.NestedTensor((video, audio))

    def cond(seed):
        return [[torch.randn(1, 64, caption_channels, generator=torch.Generator().manual_seed(seed)),
                 {"pooled_output": None, "unprocessed_ltxav_embeds": True, "frame_rate": 25.0}]]

    noise = comfy.nested_tensor.NestedTensor(tuple(torch.randn(t.shape, generator=g) for t in (video, audio)))
    return latent, noise, cond(1), cond(2), video.shape[2] * video.shape[3] * video.shape[4]


def chunk_ffn(patcher, ffn):
    """The pack's FFN chunking on ``patcher`` as the FFN Chunker node sets it: "auto", a chunk count, or "1" (off)."""
    from ltxav_pack import ffn_chunking

    if ffn != "1":
        patcher.model_options.setdefault("transformer_options", {})[ffn_chunking.CHUNKING_KEY] = \
            ffn_chunking.ChunkSettings(1 if ffn == "auto" else int(ffn), ffn == "auto").as_dict()
        ffn_chunking.set_wrappers(patcher, True)


# Kernel kinds in a profiler trace, by the first of these name fragments a kernel's name contains
KINDS = (("communication", ("nccl",)), ("attention", ("flash", "fmha", "attention", "attn")),
         ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
         ("copies", ("copy", "memcpy", "memset", "cat", "gather", "index", "transpose")))


def kind_of(name):
    low = name.lower()
    return next((k for k, keys in KINDS if any(key in low for key in keys)), "other")


def union_s(intervals):
    """Total length of the union of (start, end) intervals (microseconds in, seconds out)."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e6


def gaps_between(kernels):
    """Each stretch with no kernel on the GPU: (start, kernel that ended it), in time order."""
    end = None
    for e in sorted(kernels, key=lambda e: e["ts"]):
        if end is not None and e["ts"] > end:
            yield end, e
        end = max(end or 0, e["ts"] + e["dur"])


def device_info():
    import torch

    cuda = torch.cuda.is_available()
    return dict(device=torch.cuda.get_device_name() if cuda else "cpu",
                date=datetime.date.today().isoformat(), torch=torch.__version__,
                python=platform.python_version())


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_json(path, payload):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")


class JsonLines:
    """A script's records as JSON lines: each logged, and appended to ``path`` when one is given."""

    def __init__(self, path, log):
        self.out, self.log = (open(path, "a") if path else None), log

    def __call__(self, rec):
        line = json.dumps(rec)
        self.log.info("%s", line)
        if self.out:
            self.out.write(line + "\n")
            self.out.flush()

    def close(self):
        if self.out:
            self.out.close()


def free_port() -> int:
    """A free port on loopback, for single-process runs that start a process group themselves."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
