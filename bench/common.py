"""Shared set-up for the GPU benchmarks: ComfyUI on sys.path, the pack imported as a package,
an LTXAV model at real LTX-2 dims with random weights, and its inputs."""
import datetime
import importlib.util
import json
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GB = 1 << 30

LTX2_DIMS = dict(num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096,
                 audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048,
                 caption_channels=3840)
TINY_DIMS = dict(num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                 audio_num_attention_heads=4, audio_attention_head_dim=4, audio_cross_attention_dim=16,
                 caption_channels=16, connector_num_attention_heads=2, connector_attention_head_dim=8)


def import_comfy(path):
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


def device_info():
    cuda = torch.cuda.is_available()
    return dict(device=torch.cuda.get_device_name() if cuda else "cpu",
                date=datetime.date.today().isoformat(), torch=torch.__version__,
                python=platform.python_version())


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_json(path, payload):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")
