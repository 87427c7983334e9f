"""The sequence-parallel forward over W ranks with xfuser (xDiT): pad -> shard -> run -> gather.

``SequenceParallel`` is this process's part (its groups, attention kernel, per-run constants and
memory peaks); its ``diffusion_model_wrapper`` is a ComfyUI DIFFUSION_MODEL wrapper that runs one
forward of a registered model family (``models``) as a ``ShardedForward``:

1. the family's hooks (``Hooks.patches``) set instance attributes on the model for this forward only,
   so that ComfyUI's own forward embeds and positions just this rank's share of the sequence (the
   hook calls ``ShardedForward.shard`` once it knows the length: ``ShardLayout`` pads it to a multiple
   of W at the end) and gathers the output (``ShardedForward.gather``, padding cut off);
2. every attention call goes through ``attention_override`` (ComfyUI's
   ``optimized_attention_override``), routed by the ``Role`` the family gave the calling module:
   ``SHARDED_SELF`` runs Ulysses (all-to-all, ``sequence_parallel.ulysses``) or, with a ring degree,
   xfuser's long-context attention; ``SHARDED_KEYS`` merges each rank's partial softmax exactly;
   other calls (local cross-attention), and every call of a group of one, run as on one GPU; with a
   mask the keys are gathered;
3. padding keys are marked NaN in self-attention and dropped by the kernel, padding queries are cut
   off at the gather, so real tokens never see padding.

Adding a model family: one module in ``models`` and its registry line (``models.register``).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from . import instrumentation, lean_attention, models, xfuser_compat
from .patching import instance_attrs
from .sequence_parallel import Role
from .sequence_parallel.attention import PaddingDroppingKernel, head_group_size, ring_attention, sharded_keys_attention
from .sequence_parallel.constants import RunConstants
from .sequence_parallel.layout import ShardLayout
from .sequence_parallel.ulysses import HEAD_GROUPS, ulysses_attention

WRAPPER_KEY = "ltxav_sequence_parallel"
# Anything that is not a yunchang AttnType makes xfuser call our ``attn_processor`` as the kernel.
_PROCESSOR_ATTN_TYPE = "ltxav_pack_kernel"
# the Role of the attention module running now (set by _with_role around its forward)
_ROLE = contextvars.ContextVar("sequence_parallel_attention_role", default=None)
_REPORTS = {"pe": instrumentation.pe_generated, "blocks": instrumentation.blocks_complete}


def _with_role(role: Role, forward, *args, **kwargs):
    """An attention module's ``forward`` with ``role`` as the current attention role: ComfyUI's attention
    function (and so ``attention_override``) runs inside it without knowing which module called."""
    token = _ROLE.set(role)
    try:
        return forward(*args, **kwargs)
    finally:
        _ROLE.reset(token)


class SequenceParallel:
    """This process's part of a sequence-parallel forward; create after ``init_process_groups``. A
    ``parallel_kinds`` kind: its degree is the group's ranks (Ulysses x ring), its planner term the tokens
    split over them."""

    KIND = "sequence"
    WRAPPER = "DIFFUSION_MODEL"
    WRAPPER_KEY = WRAPPER_KEY

    @classmethod
    def for_rank(cls, rank: int) -> SequenceParallel:
        """A worker's part: its phase peaks kept for the run's report."""
        return cls(rank_label=rank, phase_stats=True)

    @staticmethod
    def degree(degrees) -> int:
        return degrees.sequence

    @staticmethod
    def plan_terms(degrees, passes) -> dict:
        return {"world": degrees.sequence, "ring": degrees.ring}

    def __init__(self, rank_label: int | None = None, phase_stats: bool = False):
        xf = xfuser_compat.load()
        ps = xf.parallel_state
        self.group = ps.get_sp_group().device_group
        self.rank = ps.get_sequence_parallel_rank()
        self.world = ps.get_sequence_parallel_world_size()
        self.ulysses = ps.get_ulysses_parallel_world_size()
        self.ring = ps.get_ring_parallel_world_size()
        self.rank_label = self.rank if rank_label is None else rank_label
        self.kernel = PaddingDroppingKernel()
        self.attention = xf.xFuserLongContextAttention(attn_type=_PROCESSOR_ATTN_TYPE, attn_processor=self.kernel)
        self.merge = xf.update_out_and_lse
        # phase_stats: keep per-phase allocation peaks (host-side allocator counters, no device sync)
        self.phase_stats = phase_stats and torch.cuda.is_available()
        self.stats: dict[str, int] = {}
        self.constants = RunConstants()

    def reset(self) -> None:
        """Start of a sampling run: forget the last run's peaks and constants."""
        self.stats = {}
        self.constants.clear()

    def report(self) -> dict:
        """The run's allocation peaks by phase (bytes above each forward's start; empty without phase stats)."""
        return {"stats": dict(self.stats)}

    def record(self, name: str, base: int) -> None:
        """Keep the allocation peak since ``base`` as phase ``name``'s (and the run's) peak."""
        top = torch.cuda.max_memory_allocated()
        self.stats[name] = max(self.stats.get(name, 0), top - base)
        self.stats["peak"] = max(self.stats.get("peak", 0), top - base)
        self.stats["allocated_top"] = max(self.stats.get("allocated_top", 0), top)  # the run's, not above a start

    def wrapper(self, executor, *args, **kwargs):
        """ComfyUI DIFFUSION_MODEL wrapper: run this forward sequence-parallel."""
        family = models.family_of(executor.class_obj, "Sequence parallel")
        forward = ShardedForward(self, executor.class_obj, family)
        args, kwargs = forward.with_attention_override(args, kwargs)
        with forward.installed():
            out = executor(*args, **kwargs)
        if self.phase_stats:
            self.record("output", forward.base)
        return out


class ShardedForward:
    """One forward of a model of a registered family over this process's sequence-parallel group: the
    family's hooks, the layout (known once the hooks have the inputs) and the attention routing."""

    def __init__(self, sp: SequenceParallel, model, family):
        self.sp = sp
        self.model = model
        self.family = family
        self.constants = sp.constants
        self.hooks = family.Hooks(model, self)
        self.layout: ShardLayout | None = None
        self.outer_override = None
        self.options: dict = {}
        self.base = 0
        if sp.phase_stats:
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    # -- the sequence -------------------------------------------------------
    def shard(self, tokens: int) -> ShardLayout:
        """The layout of a sequence of ``tokens`` over the group (checked: every rank gets a real token)."""
        self.layout = ShardLayout(tokens, self.sp.world, self.sp.rank)
        self.layout.check()
        self.sp.kernel.padding = self.layout.pad > 0
        return self.layout

    def gather(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's share of ``t`` along ``dim``, in order, without the padding."""
        return self.layout.gather(t, self.sp.group, dim)

    # -- installation -------------------------------------------------------
    def with_attention_override(self, args, kwargs):
        """The forward's arguments with ``attention_override`` as ComfyUI's attention override (an
        override another node set is kept and called for the kernel)."""
        options = self.family.transformer_options_of(args, kwargs)
        self.options = options
        self.outer_override = options.get("optimized_attention_override")
        options = {**options, "optimized_attention_override": self.attention_override}
        return self.family.with_transformer_options(args, kwargs, options)

    @contextlib.contextmanager
    def installed(self):
        """For the ``with`` body, in layers that each wrap what the one before installed: the family's
        patches; the lean attention's (``lean_attention``: rotary tables where they are used, output
        projections in place); its attention modules tagged with their roles; and (with memory logs or
        phase peaks) its phases measured."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(instance_attrs(self.hooks.patches()))
            if lean_attention.enabled():
                stack.enter_context(instance_attrs(lean_attention.patches(self.model, self.family, self.options)))
            stack.enter_context(instance_attrs([(module, "forward", functools.partial(_with_role, role, module.forward))
                                                for module, role in self.hooks.attention_roles()]))
            if instrumentation.enabled() or self.sp.phase_stats:
                stack.enter_context(instance_attrs([(obj, name, self.measured(getattr(obj, name), phase))
                                                    for obj, name, phase in self.hooks.phases()]))
            yield

    def measured(self, fn, phase: str):
        """``fn`` followed by its peak (phase_stats) and its log line (LTXAV_PARALLEL_MEMORY_LOG)."""
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            if instrumentation.enabled():
                device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
                _REPORTS[phase](self.sp.rank_label, device or torch.device("cpu"))
            if self.sp.phase_stats:
                self.sp.record(phase, self.base)
                torch.cuda.reset_peak_memory_stats()
            return out
        return run

    # -- attention ----------------------------------------------------------
    def attention_override(self, func, q, k, v, heads, mask=None, **kwargs):
        """ComfyUI's attention call ([B, S, heads * D] q, k, v), routed by the calling module's role."""
        role = _ROLE.get()
        if role is None or self.sp.world == 1:  # one rank holds every token: ComfyUI's call, no exchange copies
            return self.local_call(func, q, k, v, heads, mask, kwargs)
        if mask is not None:  # guide attenuation: this rank's query rows over all keys
            return self.gathered_attention(func, q, k, v, heads, mask, kwargs)
        b, n, inner = q.shape
        d = inner // heads
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d) for t in (q, k, v))
        if role is Role.SHARDED_KEYS:
            out = sharded_keys_attention(q, k, v, self.layout.real, self.sp.group, self.sp.world, self.sp.merge)
        elif self.sp.ring == 1:
            def kernel(q_, k_, v_, h):
                return self.kernel_call(func, q_, k_, v_, h, None, kwargs)
            group = head_group_size(heads, self.sp.ulysses, HEAD_GROUPS)
            out = ulysses_attention(kernel, q, k, v, group, self.layout.total, self.sp.attention.ulysses_pg)
        else:
            out = ring_attention(self.sp.attention, q, k, v, self.sp.ulysses, self.layout.real)
        return out.reshape(b, n, inner)

    def gathered_attention(self, func, q, k, v, heads, mask, kwargs):
        """With a mask (its rows are this rank's queries): all ranks' keys and values, then the kernel."""
        return self.kernel_call(func, q, self.gather(k), self.gather(v), heads, mask, kwargs)

    def local_call(self, func, q, k, v, heads, mask, kwargs):
        """An attention call of this rank's tokens alone: the kernel, with the lean attention's output
        written into the queries' buffer a range at a time (``lean_attention.attention_into_query``)."""
        if not lean_attention.enabled():
            return self.kernel_call(func, q, k, v, heads, mask, kwargs)
        return lean_attention.attention_into_query(
            lambda q_, k_, v_, h, mask=None, **kw: self.kernel_call(func, q_, k_, v_, h, mask, kw), q, k, v, heads,
            mask, **kwargs)

    def kernel_call(self, func, q, k, v, heads, mask, kwargs):
        """ComfyUI's attention function (or an override another node installed)."""
        if self.outer_override is not None:
            return self.outer_override(func, q, k, v, heads, mask=mask, **kwargs)
        return func(q, k, v, heads, mask=mask, **kwargs)
