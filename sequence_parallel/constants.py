"""Tensors that stay the same through a sampling run but that a model's forward makes again on every
step, kept on the device for the run."""
from __future__ import annotations

import torch


class RunConstants:
    """Tensors that stay the same through a sampling run but that ComfyUI's forward makes again on
    every step: token positions (computed on the host here) and the double-precision RoPE grids.
    A copy from pageable host memory to the GPU makes the host wait until the GPU has run everything
    queued, and the GPU then idles while the host queues the next kernels; here each crosses once a
    run, and is reused while its host value is equal and nothing has written to the device copy."""

    def __init__(self):
        self._kept: dict = {}

    def clear(self) -> None:
        self._kept.clear()

    def host(self, key, make):
        """``make()``'s tensor, made once and reused while nothing has written to it."""
        key = ("host", key)
        kept = self._kept.get(key)
        if kept is not None and kept[0]._version == kept[1]:
            return kept[0]
        t = make()
        self._kept[key] = (t, t._version)
        return t

    def on(self, device: torch.device, key, host: torch.Tensor) -> torch.Tensor:
        """``host`` on ``device``: the kept copy when it still holds the same values, else a new one."""
        if host.device == device:
            return host
        key = (str(device), key)
        kept = self._kept.get(key)
        if kept is not None:
            src, dev, version = kept
            if dev._version == version and src.dtype == host.dtype and torch.equal(src, host):  # equal: same shape too
                return dev
        dev = host.to(device)
        self._kept[key] = (host.clone(), dev, dev._version)
        return dev


