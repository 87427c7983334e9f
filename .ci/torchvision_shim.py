"""Test-environment shim (installed into the test venv by .ci/setup_env.sh, never shipped).

PyPI's torchvision wheel cannot register its compiled ops next to the CPU torch 2.13 build, and its
Python layer then fails with "operator torchvision::nms does not exist". ComfyUI imports torchvision
at start-up. Declaring the two op schemas before torchvision's first import lets its pure-Python
parts load; the ops themselves are never called by the LTXAV code paths.
"""
import importlib.abc
import sys


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            sys.modules["_ltxav_tv_shim"]._lib = lib  # keep the registration alive
        except RuntimeError:  # already defined: torchvision's own ops loaded fine
            pass
        return None


sys.meta_path.insert(0, _Finder())
