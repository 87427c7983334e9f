"""ComfyUI's official LTX-2 / LTX-2.3 templates (the installed package) run on tiny stand-ins, for
tests/test_official_templates.py: the files they load, under their names; and their API prompts (as
ComfyUI's front end makes them) turned into tiny runs.

What stands in for what:
- each checkpoint a template names: a tiny whole LTX-2 or LTX-2.3 checkpoint (diffusion model, video VAE,
  audio VAE and vocoder: ``tiny_ltxav.write_tiny_checkpoint``); each LoRA: a tiny LoRA on that model's
  attention and FFN; each latent upscaler: a tiny latent upsampler; their images and audio: small files;
- the Gemma text encoder (which no stock code makes tiny): each CLIPTextEncode becomes LoadTrainingDataset
  serving a conditioning as CLIPTextEncode gives it (raw embeddings through the checkpoint's own text
  connectors, ``comfy_host.make_conditioning``), a different one per prompt node; the text encoder
  loader goes;
- the templates' 1280x720, 5-10 s clips: 256x192, one second (Width, Height, Duration, Length primitives),
  input images resized to at most 256 pixels; every RandomNoise a fixed seed.
Every other node (samplers, guiders, LoRA stacks, guides, audio masks, the latent upsampler, decoders,
SaveVideo) runs as the template has it. SaveLatent nodes keep each sampler's video and audio latents.
"""
import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from .comfy_host import ROOT, make_conditioning
from .tiny_ltxav import TINY_CONFIG, VERSIONS, context_width, write_lora, write_tiny_checkpoint, write_tiny_upscaler

WIDTH, HEIGHT, SECONDS, LENGTH, LONGER_EDGE = 256, 192, 1, 25, 256
SEED = 42
LORA_KEYS = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.0.proj",
             "transformer_blocks.1.attn2.to_v", "transformer_blocks.1.audio_ff.net.2")
MODEL_FOLDERS = {"CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
                 "LTXVAudioVAELoader": {"ckpt_name": "checkpoints"},
                 "LTXAVTextEncoderLoader": {"text_encoder": "text_encoders", "ckpt_name": "checkpoints"},
                 "LoraLoaderModelOnly": {"lora_name": "loras"},
                 "LatentUpscaleModelLoader": {"model_name": "latent_upscale_models"}}
SAMPLERS = ("SamplerCustomAdvanced", "LTXAVParallelSamplerCustomAdvanced")
F64_LOADER = "LTXAVTestCheckpointLoaderFloat64"  # tests/helpers/float64_nodes


def from_templates():
    """example_workflows/from_templates.py, the generator of the pack's parallel versions."""
    path = ROOT / "example_workflows" / "from_templates.py"
    spec = importlib.util.spec_from_file_location("ltxav_from_templates", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def all_nodes(wf: dict) -> list[dict]:
    """The nodes of a UI-format workflow and of its subgraphs."""
    return [*wf["nodes"], *(n for sg in wf.get("definitions", {}).get("subgraphs", []) for n in sg["nodes"])]


def version_of(wf: dict) -> str:
    """LTX-2.3 or LTX-2, by the checkpoint the template loads."""
    (ckpt,) = {n["widgets_values"][0] for n in all_nodes(wf) if n["type"] == "CheckpointLoaderSimple"}
    return "2.3" if "2.3" in ckpt else "2"


def files_of(wf: dict) -> dict[str, set]:
    """{models folder or "input": file names} the template loads."""
    out = {}
    for n in all_nodes(wf):
        if n.get("mode", 0) != 0:
            continue
        for widget, folder in MODEL_FOLDERS.get(n["type"], {}).items():
            index = {"LTXAVTextEncoderLoader": {"text_encoder": 0, "ckpt_name": 1}}.get(n["type"], {}).get(widget, 0)
            out.setdefault(folder, set()).add(n["widgets_values"][index])
        if n["type"] in ("LoadImage", "LoadAudio"):
            out.setdefault("input", set()).add(n["widgets_values"][0])
    return out


def write_stand_ins(base: Path, templates: list[dict], tmp: Path) -> list[Path]:
    """The tiny files every template loads, under their names in the server's ``base``; and the
    conditioning datasets for both model versions. Returns the paths written."""
    from PIL import Image

    written = []
    ckpts = {}
    for version in VERSIONS:
        ckpts[version] = tmp / f"tiny_full_{version}.safetensors"
        write_tiny_checkpoint(ckpts[version], version=version)
    for wf in templates:
        version = version_of(wf)
        for folder, names in files_of(wf).items():
            for name in sorted(names):
                path = base / ("input" if folder == "input" else f"models/{folder}") / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if folder == "checkpoints":
                    path.write_bytes(ckpts["2.3" if "2.3" in name else "2"].read_bytes())
                elif folder == "loras":
                    write_lora(ckpts[version], LORA_KEYS, path, seed=sum(map(ord, name)))
                elif folder == "latent_upscale_models":
                    write_tiny_upscaler(path, seed=len(name))
                elif folder == "text_encoders":
                    path.write_bytes(b"")  # never loaded: the front end only checks it is there
                elif path.suffix == ".png":
                    g = np.random.default_rng(len(name))
                    Image.fromarray(g.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)
                else:
                    write_audio(path, seed=len(name))
                written.append(path)
    for version in VERSIONS:
        width = context_width({**TINY_CONFIG, **VERSIONS[version]})
        for k in range(2):
            d = base / "output" / dataset(version, k)
            d.mkdir(parents=True, exist_ok=True)
            torch.save({"latents": [{"samples": torch.zeros(1, 8, LENGTH + 1, 16), "type": "audio"}],
                        "conditioning": [make_conditioning(width, tokens=12, seed=10 + k)]}, d / "shard_000.pkl")
    return written


def dataset(version: str, k: int) -> str:
    return f"template_text_{version.replace('.', '_')}_{k}"


def write_audio(path: Path, seconds=2.0, rate=16000, seed=0):
    """A short tone with noise, encoded as the file's suffix says (mp3)."""
    import av

    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * g.standard_normal(t.shape)).astype(np.float32)
    with av.open(str(path), "w", format=path.suffix[1:]) as container:
        stream = container.add_stream(path.suffix[1:], rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def stages(prompt: dict) -> list[str]:
    """The sampler nodes of an API prompt, in the order they run (a later stage takes an earlier one's
    output)."""
    def upstream(nid, seen):
        for v in prompt[nid]["inputs"].values():
            if isinstance(v, list) and v[0] not in seen:
                seen.add(v[0])
                upstream(v[0], seen)
        return seen

    samplers = [k for k, v in prompt.items() if v["class_type"] in SAMPLERS]
    return sorted(samplers, key=lambda k: len({s for s in samplers if s in upstream(k, set())}))


def tiny(prompt: dict, version: str, tag: str, float64=False, decode=True) -> dict:
    """The template's API prompt on the stand-ins (see the module docstring); ``float64``: the diffusion
    model loaded in float64 (the reference); ``decode`` False: without SaveVideo (ComfyUI then runs
    no decoder). SaveLatent nodes ``save{i}v`` / ``save{i}a`` keep stage i's video and audio latents under
    ``latents/{tag}_s{i}_v`` / ``_a``."""
    p = copy.deepcopy(prompt)
    if not decode:
        p = {k: v for k, v in p.items() if v["class_type"] != "SaveVideo"}
    texts = sorted(k for k, v in p.items() if v["class_type"] == "CLIPTextEncode")
    for k, nid in enumerate(texts):
        p[nid] = {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": dataset(version, k)}}
    for node in p.values():  # CLIPTextEncode's CONDITIONING (slot 0) is LoadTrainingDataset's slot 1
        for name, v in node["inputs"].items():
            if isinstance(v, list) and v[0] in texts:
                node["inputs"][name] = [v[0], 1]
    for nid in [k for k, v in p.items() if v["class_type"] == "LTXAVTextEncoderLoader"]:
        del p[nid]
    for node in p.values():
        cls, inputs, title = node["class_type"], node["inputs"], node.get("_meta", {}).get("title", "").lower()
        if cls in ("PrimitiveInt", "PrimitiveFloat"):
            value = {"width": WIDTH, "height": HEIGHT, "duration": SECONDS, "length": LENGTH}.get(title)
            if value is not None:
                inputs["value"] = float(value) if cls == "PrimitiveFloat" else value
        elif cls == "EmptyImage":
            inputs["width"], inputs["height"] = WIDTH, HEIGHT
        elif cls == "ResizeImagesByLongerEdge":
            inputs["longer_edge"] = LONGER_EDGE
        elif cls == "RandomNoise":
            inputs["noise_seed"] = SEED
        elif cls == "CheckpointLoaderSimple" and float64:
            node["class_type"] = F64_LOADER
        elif cls == "SaveVideo":
            inputs["filename_prefix"] = f"video/{tag}"
    for i, nid in enumerate(stages(p)):
        p[f"sep{i}"] = {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": [nid, 0]}}
        for slot, kind in enumerate("va"):
            p[f"save{i}{kind}"] = {"class_type": "SaveLatent", "inputs": {
                "samples": [f"sep{i}", slot], "filename_prefix": f"latents/{tag}_s{i}_{kind}"}}
    return p


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
