"""How close the pack's result must be to stock ComfyUI's: bounds from the arithmetic, not one machine.

Every equality test has three results from the same weights and inputs:

* ``reference``: stock ComfyUI with the model in float64 (its rounding, ~1e-16, is nil at this scale;
  ComfyUI's sampler keeps its latents in float32, which adds a few float32 roundings a step);
* ``stock``: stock ComfyUI in the test's dtype (float32, or bfloat16), what a user runs;
* ``got``: the pack's path in the same dtype (chunked FFN, sequence shards, Ray workers): the same
  operations, summed and split in another order.

Both low-precision results carry rounding errors of the same kind and number (one rounding per
operation, the same depth of layers and sampling steps), so they sit at the same distance from the
reference whatever the machine: the pack's path passes when

    rel_l2(got, reference) <= FACTOR * rel_l2(stock, reference) + EXTRA_ROUNDINGS * eps(dtype)

FACTOR covers a different order of the same roundings; EXTRA_ROUNDINGS the few operations the pack
adds per output element (merging partial softmaxes through their log-sum-exp: an exp, a log, a
division; a gather). A lost, shifted or rescaled piece of the computation is orders of magnitude
above that, and each equality test has a twin that shows it (the ``broken`` tests).

``stock`` must itself stay within the a-priori float bound of a computation of that depth
(``max_rel_error``), or the reference is not the same computation (other weights, other seed) and
the bound would mean nothing.
"""
from __future__ import annotations

import math

import torch

FACTOR = 4.0
EXTRA_ROUNDINGS = 16
# Longest chain of dependent roundings in the tiny model's sampling (a few steps x 2 layers x a few
# dozen operations, each dot product of <= 128 terms summed pairwise): far under 2**10.
SEQUENTIAL_ROUNDINGS = 1024


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def max_rel_error(dtype: torch.dtype) -> float:
    """A priori bound on a low-precision result's relative error: gamma_n = n eps / (1 - n eps)."""
    n = SEQUENTIAL_ROUNDINGS * eps(dtype)
    return n / (1 - n) if n < 1 else math.inf


def parts(x) -> list[torch.Tensor]:
    """A tensor, a NestedTensor (video, audio), a LATENT dict or a list of tensors, as a list."""
    if isinstance(x, dict):
        x = x["samples"]
    if getattr(x, "is_nested", False):  # ComfyUI's NestedTensor is no torch.Tensor
        return list(x.unbind())
    if isinstance(x, torch.Tensor):
        return [x]
    assert isinstance(x, (list, tuple)), f"not a result: {type(x).__name__}"
    return [t for item in x for t in parts(item)]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def bound(stock_error: float, dtype: torch.dtype) -> float:
    return FACTOR * stock_error + EXTRA_ROUNDINGS * eps(dtype)


def errors(got, stock, reference, dtype=None) -> list[tuple[float, float, float]]:
    """Per output part: (got's error, stock's error, the bound), each against the reference. ``dtype``:
    the precision the model computes in (default: the results' own; ComfyUI's sampler returns float32
    latents from a bfloat16 model)."""
    got, stock, reference = parts(got), parts(stock), parts(reference)
    assert len(got) == len(stock) == len(reference) > 0, (len(got), len(stock), len(reference))
    out = []
    for g, s, r in zip(got, stock, reference):
        assert g.shape == s.shape == r.shape, (g.shape, s.shape, r.shape)
        e_stock = rel_l2(s, r)
        out.append((rel_l2(g, r), e_stock, bound(e_stock, dtype or s.dtype)))
    return out


def assert_matches(got, stock, reference, what: str = "", dtype=None) -> None:
    """``got`` is as close to ``reference`` as stock's own rounding allows (see the module docstring)."""
    for i, (e_got, e_stock, b) in enumerate(errors(got, stock, reference, dtype)):
        dtype = dtype or parts(stock)[i].dtype
        assert 0 < e_stock <= max_rel_error(dtype), (
            f"{what} part {i}: stock's error against the reference is {e_stock:.3e}, outside (0, "
            f"{max_rel_error(dtype):.1e}]: the reference is not the same computation")
        assert e_got <= b, (f"{what} part {i}: relative L2 to the float64 reference {e_got:.3e} > bound {b:.3e} "
                            f"(stock's own error {e_stock:.3e})")


def mismatches(got, stock, reference, dtype=None) -> bool:
    """True when ``assert_matches`` rejects ``got`` (for the twins that show a check can fail)."""
    try:
        assert_matches(got, stock, reference, dtype=dtype)
    except AssertionError:
        return True
    return False
