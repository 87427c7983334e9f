"""Tiny LTXAV checkpoints in GGUF, written with the ``gguf`` package the way ComfyUI-GGUF's tools write
them: ``tools/convert.py`` (architecture ``ltxv``; one-dimensional, small and ``scale_shift_table``
tensors in F32, the rest F16), then its llama.cpp patch's quantization (``tools/lcpp.patch``: the
two-dimensional weights, but LTXV's adaLN, caption projection, patchify and output projection), F16
where a row does not fill whole blocks.

ComfyUI-GGUF hands ComfyUI's model detection no metadata, and for LTXAV the detection takes every size
but the layer count and the head width from the real model's defaults: a tiny model needs its config.
The file carries it (JSON bytes) in one more tensor, ``CONFIG_KEY``, which ``.ci/tiny_gguf_shim.py`` (installed in
the test venv) hands the detection as the safetensors checkpoint's metadata does; nothing else reads it.
"""
import json

import numpy as np
import torch

CONFIG_KEY = "ltxav_test_config"
# convert.py's threshold and its LTXV high-precision keys; lcpp.patch's LTXV tensors left unquantized
QUANTIZATION_THRESHOLD = 1024
HIGH_PRECISION = ("scale_shift_table",)
NOT_QUANTIZED = ("adaln_single.", "caption_projection.", "patchify_proj.", "proj_out.", "scale_shift_table")


def tensor_type(key: str, shape, qtype: str) -> str:
    """The GGUF type ComfyUI-GGUF's tools give a tensor of a float checkpoint (its name and shape), with the
    large weights quantized to ``qtype``: F32, F16 or ``qtype`` (F16 then stands in when a row does not
    fill whole blocks)."""
    size = 1
    for n in shape:
        size *= n
    if len(shape) == 1 or size <= QUANTIZATION_THRESHOLD or any(k in key for k in HIGH_PRECISION):
        return "F32"
    if len(shape) == 2 and key.endswith(".weight") and not any(k in key for k in NOT_QUANTIZED):
        return qtype
    return "F16"


def write_tiny_gguf(safetensors_path, path, qtype="Q8_0"):
    """Write the tiny safetensors checkpoint at ``safetensors_path`` (``tiny_ltxav.write_tiny_ltxav``) as a
    GGUF file with its large tensors in ``qtype`` (a ``gguf.GGMLQuantizationType`` name: Q8_0, Q4_0, ...);
    returns {tensor name: its GGUF type name}."""
    import gguf
    from safetensors import safe_open

    writer = gguf.GGUFWriter(path=None, arch="ltxv")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "Q8_0" else gguf.LlamaFileType.MOSTLY_Q4_0)
    types = {}
    with safe_open(str(safetensors_path), "pt") as f:
        config = json.loads(f.metadata()["config"])
        for key in f.keys():
            data = f.get_tensor(key).to(torch.float32).numpy()
            qt = gguf.GGMLQuantizationType[tensor_type(key, data.shape, qtype)]
            try:
                raw = gguf.quants.quantize(data, qt)
            except (AttributeError, gguf.QuantError):  # rows that do not fill whole blocks: F16, as convert.py
                qt = gguf.GGMLQuantizationType.F16
                raw = gguf.quants.quantize(data, qt)
            writer.add_tensor(key, raw, raw_dtype=qt)
            types[key] = qt.name
    marker = np.frombuffer(json.dumps(config).encode(), dtype=np.int8).copy()
    writer.add_tensor(CONFIG_KEY, marker, raw_dtype=gguf.GGMLQuantizationType.I8)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def load_gguf(loader_class, name, dequant_dtype=None, patch_dtype=None, patch_on_device=None):
    """ComfyUI-GGUF's loader node (``UnetLoaderGGUF`` or ``UnetLoaderGGUFAdvanced``) on ``name`` from
    ComfyUI's diffusion_models folders, as its node runs."""
    node = loader_class()
    if dequant_dtype is None:
        return node.load_unet(name)[0]
    return node.load_unet(name, dequant_dtype, patch_dtype, patch_on_device)[0]


def float64_twin(model, path):
    """The float64 reference of a GGUF ``model`` read from ``path``: ComfyUI's loader on the same file with
    the same ComfyUI-GGUF operations (so the same dequantized weights) and float64 as the model's dtype."""
    import sys

    import comfy.sd

    gguf_nodes = sys.modules[type(model).__module__]
    ops = model.model.model_config.custom_operations
    ref = comfy.sd.load_diffusion_model_state_dict(gguf_nodes.gguf_sd_loader(str(path)),
                                                   model_options={"custom_operations": ops, "dtype": torch.float64})
    ref = gguf_nodes.GGUFModelPatcher.clone(ref)
    ref.patch_on_device = model.patch_on_device
    return ref
