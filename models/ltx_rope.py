"""LTX-2's rotary position tables made for a range of tokens where attention uses them, never for the
whole sequence at once.

ComfyUI's LTX forward makes the (cos, sin) tables of every token once per forward
(``_precompute_freqs_cis``: video, audio and the two audio-video cross ones, through
``_prepare_positional_embeddings``) and keeps them through every block: at long lengths, with the
float32 temporaries of making them, the largest thing on the GPU. Here that call is recorded instead
(``deferred``: its positions and arguments, a ``RotaryTable``), and each attention module that gets
one normalises and rotates its queries and keys a range of tokens at a time, in place
(``attention_forward``), with its own norm and ComfyUI's own ``apply_rotary_emb`` on the rows of that
range: neither the tables nor a second copy of q or k exists for the whole sequence.

The rows are ComfyUI's to the bit. Every column of a table depends on one position axis only
(ComfyUI 0.20.1's layout: frequency j of axis a at column ``pad + j * axes + a`` after ``pad`` constant
columns; the split layout then reads the columns as heads x head-dim, the interleaved one repeats each
column twice): so ComfyUI's own ``_precompute_freqs_cis`` runs once on a few pseudo-tokens, the k-th
holding the k-th distinct position of every axis (a few hundred at most), and a range's rows are
gathered from it. The layout is checked against ComfyUI's direct result on sample tokens once per
configuration per process; where it differs (another ComfyUI) ranges are made directly by ComfyUI's
function, which is slower but as exact.
"""
from __future__ import annotations

import logging

import torch

from ..patching import instance_attrs, may_overwrite

log = logging.getLogger(__name__)
# tokens a table range covers: its rows and the rotation's temporaries take about 30 KB a video token
# (LTX-2: 4096 wide), ~0.25 GiB a range; a sequence this short gets its whole table, kept for the forward
CHUNK_TOKENS = 8192
SAMPLE_TOKENS = 8  # tokens at each end of a table that the layout check compares with ComfyUI's own rows
_LAYOUT_OK: dict = {}  # configuration -> whether gathered rows equal ComfyUI's (checked once a process)


def _bounds(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


class RotaryTable:
    """One deferred ``_precompute_freqs_cis(indices_grid, ...)`` call: ``make`` is the model's own method,
    ``args`` / ``kwargs`` the call's, ``grid`` [B, axes, T(, 2)] the positions. ``rows(start, end)`` is
    ComfyUI's ``(cos, sin, split)`` for tokens [start, end); ``rotate(x)`` applies it to ``x``
    [B, T, heads * dim] as ComfyUI's ``apply_rotary_emb`` does."""

    def __init__(self, make, args: tuple, kwargs: dict):
        self.make, self.args, self.kwargs = make, args, kwargs
        self.grid = args[0] if args else kwargs["indices_grid"]
        self.tokens = self.grid.shape[2]
        self._whole = None
        self._gather = None  # _Gather once built, False where the layout check failed

    def _direct(self, start: int, end: int):
        grid = self.grid[:, :, start:end]
        if self.args:
            return self.make(grid, *self.args[1:], **self.kwargs)
        return self.make(**{**self.kwargs, "indices_grid": grid})

    def whole(self):
        """The whole table, as ComfyUI's forward would have made it (kept for this forward)."""
        if self._whole is None:
            self._whole = self.rows(0, self.tokens)
        return self._whole

    def rows(self, start: int, end: int):
        if self._gather is None:
            self._gather = _Gather.checked(self)
        if not self._gather:
            return self._direct(start, end)
        return self._gather.rows(start, end)

    def rotate(self, x: torch.Tensor, norm=None) -> torch.Tensor:
        """``norm(x)`` (a per-token norm, or nothing) rotated: with the whole table when the sequence fits
        one range (new tensors, as ComfyUI makes them), else a range at a time into ``x`` itself when it
        is the caller's temporary (ComfyUI's to_q / to_k output, which it drops for the norm's)."""
        from comfy.ldm.lightricks.model import apply_rotary_emb

        n = x.shape[1] if x.dim() == 3 else 0
        if n <= CHUNK_TOKENS or n != self.tokens:
            return apply_rotary_emb(x if norm is None else norm(x), self.whole())
        # to_q / to_k's output is a view of the projection's 2-D result, spanning all of it
        out = x if may_overwrite(x, whole_view=True) else torch.empty_like(x)
        for start, end in _bounds(n, CHUNK_TOKENS):
            part = x[:, start:end] if norm is None else norm(x[:, start:end])
            out[:, start:end] = apply_rotary_emb(part, self.rows(start, end))
        return out

    # code that reads the table as ComfyUI's (cos, sin, split) tuple gets the whole of it
    def __getitem__(self, i):
        if not getattr(self, "_warned", False):
            self._warned = True
            log.info("LTX rotary tables: a module read a whole table (%d tokens); it is made for every token, "
                     "as stock ComfyUI makes it", self.tokens)
        return self.whole()[i]

    def __len__(self):
        return 3


class _Gather:
    """A table's rows gathered per axis from ComfyUI's rows for each distinct position (see the module
    docstring)."""

    def __init__(self, table: RotaryTable):
        grid = table.grid
        b, axes, n = grid.shape[:3]
        tail = grid.shape[3:]
        inverse, distinct = [], []
        for a in range(axes):
            values, index = torch.unique(grid[:, a].reshape(b * n, -1), dim=0, return_inverse=True)
            distinct.append(values)
            inverse.append(index.view(b, n))
        k = max(len(v) for v in distinct)
        pseudo = grid.new_empty((1, axes, k, *tail))
        for a, values in enumerate(distinct):
            pseudo[0, a, :len(values)] = values.view(len(values), *tail)
            pseudo[0, a, len(values):] = values[-1].view(*tail)
        if table.args:
            cos, sin, split = table.make(pseudo, *table.args[1:], **table.kwargs)
        else:
            cos, sin, split = table.make(**{**table.kwargs, "indices_grid": pseudo})
        self.split, self.batch, self.inverse = split, b, inverse
        if split:  # [1, H, K, D/2] from [1, K, H, D/2]: the columns as ComfyUI laid them out before the heads
            self.heads, self.head_dim = cos.shape[1], cos.shape[3]
            cos, sin = (t.swapaxes(1, 2).reshape(k, -1) for t in (cos, sin))
        else:
            cos, sin = cos.reshape(k, -1), sin.reshape(k, -1)
        self.width = cos.shape[1]
        self.step = axes * (1 if split else 2)
        self.pad = self.width % self.step
        self.offsets = [[a] if split else [2 * a, 2 * a + 1] for a in range(axes)]
        self.pad_cos, self.pad_sin = cos[0, :self.pad], sin[0, :self.pad]
        first = [self.pad + o[0] for o in self.offsets]
        self.cos = [cos[:, f::self.step].contiguous() for f in first]  # per axis: [K, frequencies]
        self.sin = [sin[:, f::self.step].contiguous() for f in first]

    @classmethod
    def checked(cls, table: RotaryTable):
        """A gather for ``table``, or False where its rows would differ from ComfyUI's (the layout is
        checked once per configuration in this process, on the first and last tokens)."""
        key = (table.make.__qualname__ if hasattr(table.make, "__qualname__") else type(table.make), table.grid.dim(),
               table.grid.shape[1], repr(table.args[1:]), repr(sorted(table.kwargs.items(), key=lambda kv: kv[0])))
        try:
            gather = cls(table)
        except (RuntimeError, ValueError, IndexError) as e:  # positions of an unexpected shape
            log.info("LTX rotary tables: made per range by ComfyUI's function (%s)", e)
            return False
        if key not in _LAYOUT_OK:
            n = table.tokens
            ends = _bounds(n, SAMPLE_TOKENS)
            ok = all(all(torch.equal(a, b) for a, b in zip(gather.rows(s, e)[:2], table._direct(s, e)[:2]))
                     for s, e in {ends[0], ends[-1]})
            _LAYOUT_OK[key] = ok
            if not ok:
                log.warning("LTX rotary tables: ComfyUI's table layout is not the one this pack knows; tables are "
                            "made per range by ComfyUI's own function instead (exact, slower)")
        return gather if _LAYOUT_OK[key] else False

    def rows(self, start: int, end: int):
        """``(cos, sin, split)`` for tokens [start, end), in ComfyUI's shapes."""
        n = end - start
        out = []
        for per_axis, pad in ((self.cos, self.pad_cos), (self.sin, self.pad_sin)):
            t = per_axis[0].new_empty((self.batch, n, self.width))
            t[..., :self.pad] = pad
            for a, values in enumerate(per_axis):
                rows = values[self.inverse[a][:, start:end]]  # [B, n, frequencies]
                for o in self.offsets[a]:
                    t[..., self.pad + o::self.step] = rows
            out.append(t.view(self.batch, n, self.heads, self.head_dim).swapaxes(1, 2) if self.split else t)
        return out[0], out[1], self.split


def deferred(make_tables):
    """The model's ``_prepare_positional_embeddings`` (``make_tables``, bound) with every table it makes
    deferred: it returns ``RotaryTable`` objects where ComfyUI's returns (cos, sin, split) tuples."""
    model = make_tables.__self__

    def run(*args, **kwargs):
        make = model._precompute_freqs_cis
        with instance_attrs([(model, "_precompute_freqs_cis", lambda *a, **k: RotaryTable(make, a, k))]):
            return make_tables(*args, **kwargs)
    return run


def _rotating(norm, table):
    """``norm``'s forward followed by ``table``'s rotation (a deferred table: both a range of tokens at a
    time, in place; or ComfyUI's tuple, as ComfyUI applies it)."""
    forward = norm.forward

    def run(x):
        if isinstance(table, RotaryTable):
            return table.rotate(x, forward)
        from comfy.ldm.lightricks.model import apply_rotary_emb

        return apply_rotary_emb(forward(x), table)
    return run


def attention_forward(attn):
    """A forward for ComfyUI's LTX ``CrossAttention`` ``attn`` that takes deferred tables: queries and
    keys are rotated right after their norms (where ComfyUI rotates them, a few lines later), and the
    module runs on without tables. Other calls go through as they are."""
    forward = attn.forward

    def run(*args, **kwargs):
        pe, k_pe = kwargs.get("pe"), kwargs.get("k_pe")
        if pe is None or not (isinstance(pe, RotaryTable) or isinstance(k_pe, RotaryTable)):
            return forward(*args, **kwargs)
        rotations = [(attn.q_norm, "forward", _rotating(attn.q_norm, pe)),
                     (attn.k_norm, "forward", _rotating(attn.k_norm, pe if k_pe is None else k_pe))]
        with instance_attrs(rotations):
            return forward(*args, **{**kwargs, "pe": None, "k_pe": None})
    return run
