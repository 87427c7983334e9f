"""Attention over a sharded sequence without an all-to-all: kernels that return the log-sum-exp,
exact merging of partial softmaxes (queries whole on every rank, keys sharded), and ring attention
(xfuser's ``xFuserLongContextAttention``) with a kernel that drops padding keys."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..patching import may_overwrite

_CUDNN_LSE = [True]  # cleared for the process when cuDNN's attention refuses (old build, unsupported GPU)


def _cudnn_with_lse(qt, kt, vt, softmax_scale):
    """cuDNN's attention ([B, H, S, D]) and its log-sum-exp [B, H, S], or (None, None): the kernel
    PyTorch's own SDPA picks for ComfyUI on Hopper, faster there than the flash kernel."""
    if not _CUDNN_LSE[0]:
        return None, None
    try:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False,
                                                                     scale=softmax_scale)[:2]
    except (RuntimeError, AttributeError):
        _CUDNN_LSE[0] = False
        return None, None
    return out, lse.reshape(qt.shape[:3])


def attention_with_lse(q, k, v, softmax_scale=None):
    """softmax(q k^T) v and its log-sum-exp (float32, for exact merging of partial results).
    q, k, v: [B, S, H, D]; returns [B, S, H, D] and [B, H, S]."""
    if k.shape[1] == 0:
        return torch.zeros_like(q), q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    aten = torch.ops.aten
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False, scale=softmax_scale)[:2]
    elif q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = _cudnn_with_lse(qt, kt, vt, softmax_scale)
        if out is None:
            out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False, scale=softmax_scale)[:2]
    else:
        out, lse = aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, False,
                                                                scale=softmax_scale)[:2]
        lse = lse[..., :q.shape[1]]
    return out.transpose(1, 2), lse.float()


class PaddingDroppingKernel:
    """The attention kernel handed to xfuser: drops NaN-marked padding keys, which are always a
    suffix of whatever key block it gets (padding sits at the end of the sequence)."""

    def __init__(self):
        self.padding = False

    def __call__(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        if self.padding:
            real = int((~torch.isnan(k[0, :, 0, 0])).sum())
            k, v = k[:, :real], v[:, :real]
        return attention_with_lse(q, k, v, softmax_scale)


# ring: xfuser's attention allocates per call, so it gets a quarter of the heads at a time
RING_HEAD_GROUPS = 4


def head_group_size(heads: int, ulysses: int, groups: int) -> int:
    """Largest head count that divides ``heads``, is a multiple of ``ulysses`` and is at most
    ``max(ulysses, heads // groups)``."""
    cap = max(ulysses, heads // groups)
    return max(g for g in range(ulysses, cap + 1, ulysses) if heads % g == 0)


def receiving(t: torch.Tensor, shape, reuse: bool = True) -> torch.Tensor:
    """``t``'s own buffer viewed as ``shape`` when ``reuse`` and ``t`` is a temporary of the caller
    that it drops after this call (``may_overwrite``), else a new buffer of that shape."""
    return t.view(shape) if reuse and may_overwrite(t, whole_view=True) else t.new_empty(shape)


def ring_attention(attention, q, k, v, ulysses: int, real: int) -> torch.Tensor:
    """Self-attention of this rank's tokens ``q``, ``k``, ``v`` [B, L, H, D] (the first ``real`` of them
    real, the rest padding) through xfuser's long-context ``attention`` (Ulysses x ring), a few heads at
    a time. Padding keys are marked NaN for ``PaddingDroppingKernel``. ComfyUI's CrossAttention makes q
    (to_q, q_norm, RoPE) for this call and drops it after; RoPE's reshape leaves it a view of a private
    copy, so q's buffer takes the output."""
    n, heads = q.shape[1], q.shape[2]
    group = head_group_size(heads, ulysses, RING_HEAD_GROUPS)
    out = receiving(q, q.shape)
    if real < n:
        k[:, real:] = float("nan")
    for h in range(0, heads, group):
        s = slice(h, h + group)
        out[:, :, s] = attention(None, q[:, :, s], k[:, :, s], v[:, :, s])
    return out


def sharded_keys_attention(q, k, v, real: int, group, world: int, merge) -> torch.Tensor:
    """Queries whole on every rank (``q`` [B, T, H, D]) over keys sharded across the ``group`` (this
    rank's ``k``, ``v`` [B, L, H, D], the first ``real`` real): each rank's partial softmax and its
    log-sum-exp, all-gathered in one call and merged with xfuser's ``merge`` (exact)."""
    out, lse = attention_with_lse(q, k[:, :real], v[:, :real])
    # one all-gather for both: output and log-sum-exp as bytes, side by side
    packed = torch.cat([out.contiguous().view(torch.uint8).flatten(), lse.contiguous().view(torch.uint8).flatten()])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    merged, merged_lse = None, None
    cut = out.numel() * out.element_size()
    for g in gathered:
        o, s = g[:cut].view(out.dtype).view(out.shape), g[cut:].view(lse.dtype).view(lse.shape)
        merged, merged_lse = merge(merged, merged_lse, o, s)
    return merged.to(q.dtype)
