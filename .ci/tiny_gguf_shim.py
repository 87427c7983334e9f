"""Test-environment shim (installed into the test venv by .ci/setup_env.sh, never shipped).

ComfyUI-GGUF's loaders give ComfyUI's model detection no metadata, and for LTXAV the detection takes
every size but the layer count and the head width from the real model (32 heads, 4096 wide, a 3840-wide
text connector): a tiny LTXAV GGUF cannot be loaded as it is. The tests' tiny GGUF files
(tests/helpers/tiny_gguf.py) carry their config as JSON bytes in a tensor named ``ltxav_test_config``;
once ``comfy.model_detection`` is imported, its ``detect_unet_config`` reads that tensor, where present
and no metadata was given, as the safetensors checkpoint's ``config`` metadata. Every other state dict
(no such tensor) is detected as before. Installed through a .pth file, so every process of the test venv
has it: the test process, ComfyUI servers and Ray workers.
"""
import importlib.abc
import importlib.machinery
import sys

KEY = "ltxav_test_config"
MODULE = "comfy.model_detection"


def _with_test_config(detect):
    def detect_unet_config(state_dict, key_prefix, metadata=None):
        marker = state_dict.get(f"{key_prefix}{KEY}") if metadata is None else None
        if marker is not None:
            import torch

            data = torch.Tensor.as_subclass(marker, torch.Tensor).cpu().numpy().tobytes()
            metadata = {"config": data.decode()}
        return detect(state_dict, key_prefix, metadata=metadata)

    return detect_unet_config


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        module.detect_unet_config = _with_test_config(module.detect_unet_config)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
