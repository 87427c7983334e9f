"""Ulysses attention over a sharded sequence: an all-to-all turns each rank's tokens x all heads into
all tokens x its share of the heads, the attention kernel runs, and an all-to-all turns it back. The
exchanged blocks use yunchang's ``all_to_all_4D`` layout (which xfuser uses); q, k and v's own
buffers receive when the caller drops them after the call, and this rank's own query block runs
while the other ranks' blocks travel.

With the lean attention, where the group is a power of two, the tokens divide it and q, k and v are the
caller's temporaries, the exchange has no send buffer (a hidden vector a local token less):
``swap_head_blocks`` swaps head blocks pairwise in q's, k's and v's own buffers through a small staging
buffer, which leaves each rank all tokens of its heads in another token order; keys and values share
that order (attention does not depend on the keys' order), the outputs go into q's buffer a query range
at a time, and the same swap puts them back in place."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import lean_attention, memory_plan
from ..patching import may_overwrite
from .attention import receiving

# Heads per all-to-all + attention call (as a share of all heads). Beyond ComfyUI's own q/k/v (which
# receive) a rank holds one sample's send buffer while its own query block runs (with that call's
# output and ComfyUI's reshaped copy of it), then its own blocks' outputs while the other ranks'
# blocks run (for one sample, at most twice q). One group runs the fewest, largest kernels; its peak
# stays under RoPE's.
HEAD_GROUPS = 1


def in_place_exchange(world: int, tokens: int, local: int) -> bool:
    """Whether a Ulysses group of ``world`` ranks, ``local`` tokens each of ``tokens`` in all, exchanges in q's,
    k's and v's own buffers (``swap_head_blocks``): the lean attention, and what the planner counts so
    (``memory_plan.exchange_in_place``: a power of two above one, no padding)."""
    return (lean_attention.enabled() and tokens == local * world
            and memory_plan.exchange_in_place(world, 1, tokens))


def swap_head_blocks(t: torch.Tensor, pg) -> None:
    """In place: ``t`` [L, W, X] holds this rank's L tokens, each in W blocks (block w for rank w's heads).
    For every other rank p (pairs ``me ^ r``, r = 1 .. W-1: W a power of two) block p is swapped with rank
    p's block ``me``, a few tokens at a time through two staging buffers of ``memory_plan.SWAP_STAGING_BYTES``;
    after it block p holds rank p's tokens of this rank's heads. The same call swaps them back."""
    world, me = dist.get_world_size(pg), dist.get_rank(pg)
    n, _, width = t.shape
    rows = max(1, min(n, memory_plan.SWAP_STAGING_BYTES // (width * t.element_size())))
    send, recv = t.new_empty((rows, width)), t.new_empty((rows, width))
    for r in range(1, world):
        peer = me ^ r
        splits = [0] * world
        for start in range(0, n, rows):
            m = min(n, start + rows) - start
            splits[peer] = m
            wide(send[:m]).copy_(wide(t[start:start + m, peer]))
            dist.all_to_all_single(recv[:m], send[:m], splits, splits, group=pg)
            wide(t[start:start + m, peer]).copy_(wide(recv[:m]))


def ulysses_in_place(kernel, q, k, v, pg) -> torch.Tensor:
    """``ulysses_attention`` with the exchange in q's, k's and v's own buffers (``in_place_exchange``): their
    head blocks swapped, each sample's attention over all tokens of this rank's heads written into q's buffer
    a query range at a time (``lean_attention.attention_into_query``), and swapped back."""
    world = dist.get_world_size(pg)
    b, n, heads, d = q.shape
    share, hd = heads // world, heads // world * d
    for t in (k, v, q):
        for i in range(b):
            swap_head_blocks(t[i].view(n, world, hd), pg)
    for i in range(b):
        qi, ki, vi = (t[i].view(1, n * world, hd) for t in (q, k, v))
        out = lean_attention.attention_into_query(lambda q_, k_, v_, h, mask=None, **_: kernel(q_, k_, v_, h),
                                                  qi, ki, vi, share)
        if out.data_ptr() != qi.data_ptr():
            qi.copy_(out)
        del out
        swap_head_blocks(q[i].view(n, world, hd), pg)
    return q


def others(world: int, me: int) -> list[tuple[int, int]]:
    """The ranks other than ``me`` as at most two contiguous ranges [lo, hi)."""
    return [(lo, hi) for lo, hi in ((0, me), (me + 1, world)) if hi > lo]


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its last dim read as 8-byte elements when its strides allow (else ``t``): a strided
    copy of bf16 moves one element per step, so the same permuted copy takes 4x fewer steps."""
    if t.dim() and t.element_size() < 8 and t.stride(-1) == 1:
        try:
            return t.view(torch.int64)
        except RuntimeError:  # odd sizes, strides or offset
            pass
    return t


def head_blocks(t: torch.Tensor, groups: int, world: int, last: int | None = None) -> torch.Tensor:
    """``t`` [B, L, H, D] (this rank's tokens, all heads) -> a new [B, G, W, L, h, D]: per sample and
    head group, one contiguous block per rank holding that rank's ``h = H/G/W`` heads, in rank order
    (yunchang's ``all_to_all_4D`` layout, which xfuser uses), or with rank ``last``'s block moved to
    the end."""
    b, n, h, d = t.shape
    share = h // groups // world
    out = t.new_empty((b, groups, world, n, share, d))
    blocks = t.view(b, n, groups, world, share, d).permute(0, 2, 3, 1, 4, 5)
    at = 0
    for lo, hi in [(0, world)] if last is None else [*others(world, last), (last, last + 1)]:
        wide(out[:, :, at:at + hi - lo]).copy_(wide(blocks[:, :, lo:hi]))
        at += hi - lo
    return out


def heads_from_sequence_shards(t: torch.Tensor, groups: int, pg, reuse: bool = True) -> torch.Tensor:
    """Ulysses all-to-all of ``t`` [B, L, H, D] (this rank's tokens, all heads) -> [B, G, W*L, h, D]:
    for each sample and head group, all tokens of this rank's heads of that group, each slice
    contiguous. One copy (the send buffer); when ``reuse`` and ``t`` is a temporary of the caller
    (``may_overwrite``) its own buffer receives."""
    world = dist.get_world_size(pg)
    b, n = t.shape[:2]
    send = head_blocks(t, groups, world)
    recv = receiving(t, send.shape, reuse)
    for i in range(b):
        for g in range(groups):
            dist.all_to_all_single(recv[i, g], send[i, g], group=pg)
    return recv.view(b, groups, world * n, *send.shape[4:])


def ulysses_attention(kernel, q, k, v, group: int, total: int, pg) -> torch.Tensor:
    """Self-attention of this rank's tokens ``q``, ``k``, ``v`` [B, L, H, D] over the ``total`` real
    tokens of the Ulysses group ``pg``, ``group`` heads at a time: all-to-all from sequence shards to
    head shards over the whole sequence, ``kernel(q, k, v, heads)`` ([1, S, heads * D] in and out: the
    model's own attention; padding keys are cut off the end), and back. Keys and values go first;
    while the other ranks' queries travel, this rank's own query block (its tokens, its heads) runs,
    and only the other blocks make the round trip. ComfyUI's CrossAttention drops q, k and v after
    this call, so when they are its own temporaries they hold the gathered heads, the other blocks
    and their way back land in q's, the output in k's."""
    world, me = dist.get_world_size(pg), dist.get_rank(pg)
    b, n, heads, d = q.shape
    groups = heads // group
    share = group // world
    hd = share * d
    reuse = len({t.untyped_storage().data_ptr() for t in (q, k, v)}) == 3  # never overwrite a shared buffer
    if (reuse and groups == 1 and in_place_exchange(world, total, n)
            and all(may_overwrite(t, whole_view=True) for t in (q, k, v))):
        return ulysses_in_place(kernel, q, k, v, pg)
    kf, vf = (heads_from_sequence_shards(t, groups, pg, reuse) for t in (k, v))  # [B, G, W*L, h, D]
    land = receiving(q, (b, groups, world, n, share, d), reuse)
    splits = [0 if w == me else n for w in range(world)]  # nothing goes to or comes from this rank
    own, back = [], []
    for i in range(b):  # one sample at a time: each slice is contiguous, no copy for the kernel
        send = head_blocks(q[i:i + 1], groups, world, last=me)[0]  # [G, W, L, h, D], the other ranks' first
        for g in range(groups):
            keys = kf[i, g, :total].view(1, total, hd), vf[i, g, :total].view(1, total, hd)
            rest = land[i, g, :world - 1].view((world - 1) * n, hd)  # the other ranks' blocks, in rank order
            arriving = dist.all_to_all_single(rest, send[g, :world - 1].view(rest.shape), splits, splits,
                                              group=pg, async_op=True)
            own.append(kernel(send[g, world - 1].view(1, n, hd), *keys, share))
            arriving.wait()
            del arriving
            if g == groups - 1:
                del send  # before the other blocks' attention: the peak stays that of one call
            o = kernel(rest.view(1, -1, hd), *keys, share)
            back.append(dist.all_to_all_single(rest, o.view(rest.shape), splits, splits, group=pg,
                                               async_op=True))
            del o
    out = kf.view(q.shape)  # k's buffer, or the one that received k
    view = out.view(b, n, groups, world, share, d)
    for j, o in enumerate(own):  # while the last blocks travel back
        wide(view[j // groups, :, j % groups, me]).copy_(wide(o.view(n, share, d)))
    del own
    for work in back:
        work.wait()
    for lo, hi in others(world, me):
        at = lo - (lo > me)  # where rank lo's block sits among the others
        wide(view[:, :, :, lo:hi]).copy_(wide(land[:, :, at:at + hi - lo].permute(0, 3, 1, 2, 4, 5)))
    return out
