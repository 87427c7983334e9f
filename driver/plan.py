"""The plan of one sampling run, decided before anything acts on it: how many workers, the degrees
(cfg x Ulysses x ring), CFG-parallel or not (with ``auto``: not where only splitting every pass over
all workers fits), the guidance passes a worker's forward holds, and the memory verdict. Pure: no Ray,
nothing started; a refusal is a ValueError naming the node, its input and what would work."""
from __future__ import annotations

import dataclasses
import logging
import os

from .. import cfg_parallel, envs, ffn_chunking, guidance_passes, lean_attention, memory_plan, models, parallel_kinds
from ..sequence_parallel.groups import Degrees, check_degrees
from ..sequence_parallel.layout import ShardLayout

log = logging.getLogger(__name__)
NODE = "LTXAV Parallel Sampler"


@dataclasses.dataclass(frozen=True)
class ParallelSettings:
    """The sampler nodes' parallel inputs: ``gpus`` 0 = all Ray sees; ``ulysses`` 0 = what the cfg-parallel
    degree and ``ring`` leave; ``cfg_parallel`` auto, on or off (``cfg_parallel.choose_degree``)."""

    gpus: int = 0
    ulysses: int = 0
    ring: int = 1
    ray_address: str = "local"
    cfg_parallel: str = "auto"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run does: ``world`` workers with ``degrees``; ``notes``: the choices' log lines (why
    cfg-parallel is or is not used); ``estimate``: the memory verdict against ``budget`` (None: no budget
    known, or the check is off), with ``per_forward`` guidance passes in each worker's forward."""

    world: int
    degrees: Degrees
    cpu: bool
    notes: tuple[str, ...] = ()
    estimate: memory_plan.Estimate | None = None
    budget: int | None = None
    per_forward: int | None = None


def unit(cpu: bool) -> str:
    """What a worker is, as the messages count them."""
    return "CPU workers" if cpu else "GPUs"


def world_of(settings: ParallelSettings, available: int, cpu: bool, address: str | None = "local") -> int:
    """The worker count ``settings`` ask for of the ``available`` ones (Ray's GPUs times the workers a GPU
    holds; on CPU its CPU slots) of the cluster at ``address``."""
    if settings.gpus < 0:
        raise ValueError(f"{NODE}: input 'gpus' is {settings.gpus}; use 0 for all GPUs or a count.")
    if cpu and settings.gpus == 0:
        raise ValueError(f"{NODE}: ComfyUI runs on the CPU, so 'gpus' counts CPU worker processes: set it "
                         "(e.g. 2); 0 (= all GPUs) has no meaning without GPUs.")
    world = settings.gpus or available
    if world < 1 or world > available:
        if cpu:
            offers = (f"offers {available} CPU slots (one a worker; more workers than this machine's "
                      f"{os.cpu_count()} cores run, slowly)") if address == "local" else \
                f"has {available} CPU slots (one a worker)"
            raise ValueError(f"{NODE}: input 'gpus' asks for {world} CPU workers, but the Ray cluster at "
                             f"{address!r} {offers}; use gpus <= {available}.")
        raise ValueError(f"{NODE}: input 'gpus' asks for {world} GPUs, but the Ray cluster at {address!r} "
                         f"has {available}; use gpus <= {available} (0 = all).")
    return world


def degrees_of(settings: ParallelSettings, world: int, cfg: int, video_heads: int, cpu: bool) -> Degrees:
    """The degrees for ``world`` workers with cfg degree ``cfg``: Ulysses and ring as the inputs say (Ulysses
    0: what ring leaves)."""
    ring = max(1, settings.ring)
    if settings.ulysses == 0:
        sequence = world // cfg
        if sequence % ring:
            raise ValueError(f"{NODE}: ring_degree={ring} does not divide gpus={world}; pick a ring_degree "
                             f"that divides {world}.")
        degrees = Degrees(sequence // ring, ring, cfg)
    else:
        degrees = Degrees(settings.ulysses, settings.ring, cfg)
    check_degrees(degrees, world, video_heads, NODE, unit=unit(cpu))
    return degrees


def plan(settings: ParallelSettings, passes, patcher, latent, available: int, cpu: bool,
         address: str | None = "local", budgets=None, infos=(), shaped: Plan | None = None) -> Plan:
    """The run's plan for ``patcher``'s model sampling ``latent`` with the job's ``passes``
    (``guidance_passes.Passes``; an int: one call of that many a step) on ``available`` workers. Without
    ``budgets`` (bytes each worker can use; None entries: unknown) it decides and checks only what no
    budget changes (workers, degrees, CFG-parallel or not), so a run can call it before any worker starts;
    with them it also decides the passes a forward holds and the memory verdict, from ``shaped`` (that
    first plan, not decided again) when given. With ``cfg_parallel`` auto, a cfg-parallel plan that does not
    fit falls back to each pass split over all workers when that fits."""
    passes = guidance_passes.Passes.of(passes)
    dm = patcher.get_model_object("diffusion_model")
    family = models.family_of(dm, NODE)
    heads = family.video_heads(dm)
    tokens = family.latent_clip(latent)[0].video_tokens
    if shaped is None:
        shaped = _shape(settings, passes, heads, tokens, available, cpu, address)
    world, degrees, notes = shaped.world, shaped.degrees, list(shaped.notes)
    known = [b for b in budgets or () if b is not None]
    if not known:
        return shaped
    budget = min(known)
    try:
        est, per_forward = fit(patcher, latent, degrees, budget, infos, passes)
    except ValueError:
        if settings.cfg_parallel != "auto" or degrees.cfg == 1:
            raise
        # auto: where the passes run one after the other, splitting each over every GPU needs less
        split_all = degrees_of(settings, world, 1, heads, cpu)
        ShardLayout(tokens, split_all.sequence, 0).check(NODE, unit(cpu))
        est, per_forward = fit(patcher, latent, split_all, budget, infos, passes)
        degrees = split_all
        notes.append(f"cfg-parallel not used (the video fits only with each pass split over all {world} GPUs)")
    return Plan(world, degrees, cpu, tuple(notes), est, budget, per_forward)


def _shape(settings: ParallelSettings, passes, heads: int, tokens: int, available: int, cpu: bool,
           address: str | None) -> Plan:
    """``plan``'s part that no budget changes: the workers, the cfg degree and the other degrees, checked."""
    world = world_of(settings, available, cpu, address)
    cfg, why = cfg_parallel.choose_degree(settings.cfg_parallel, passes, world, settings.ulysses,
                                          max(1, settings.ring), heads, NODE, unit=unit(cpu))
    notes = []
    if settings.cfg_parallel != "off" and cfg == 1 and world > 1:
        notes.append(f"cfg-parallel not used ({why})")
    elif why and cfg > 1:
        notes.append(f"cfg-parallel {cfg}: {why}")
    degrees = degrees_of(settings, world, cfg, heads, cpu)
    ShardLayout(tokens, degrees.sequence, 0).check(NODE, unit(cpu))  # else a worker finds it in its first forward
    return Plan(world, degrees, cpu, tuple(notes))


def one_gpu_here(settings: ParallelSettings, cpu: bool, cuda_devices: int) -> bool:
    """Whether a run samples in ComfyUI's own process: one GPU of the local cluster (``gpus`` 1, or 0 on a
    machine with one), nothing else asked of the degrees, one worker a GPU. A worker there would split
    nothing and keep its own CUDA context beside ComfyUI's on the same card (0.5 GiB: one length of
    clip less than stock ComfyUI on a 24 GiB card, measured). Off with LTXAV_PARALLEL_ONE_GPU_IN_PROCESS=0."""
    gpus = settings.gpus or (1 if cuda_devices == 1 else 0)
    return (envs.ONE_GPU_IN_PROCESS.on() and not cpu and gpus == 1 and envs.workers_per_gpu() == 1
            and (settings.ray_address or "local").strip() == "local" and settings.ulysses in (0, 1)
            and settings.ring in (0, 1) and settings.cfg_parallel != "on")


def streams_weights(infos) -> bool:
    """Whether the workers (their ``info()``) run ComfyUI's DynamicVRAM: weights streamed from host memory."""
    return any(i.get("dynamic_vram") for i in infos)


def model_streams(patcher, infos) -> bool:
    """Whether ``patcher``'s weights stream from host memory on the workers (``infos``): they run DynamicVRAM
    and its patcher is ComfyUI's streaming one (ComfyUI-GGUF's is not: its model loads whole, or partly as
    ComfyUI's lowvram mode loads it)."""
    return streams_weights(infos) and patcher.is_dynamic()


def passes_per_forward(patcher, clip: memory_plan.Clip, batch: int, share: int, budget: float) -> int:
    """Guidance passes one worker's forward holds. ComfyUI's calc_cond_batch batches a step's passes (with
    CFG-parallel, the group's ``share`` of them) into one forward when its own estimate for the batch
    (``BaseModel.memory_required`` of the packed latent, times 1.5) is below the free memory, else the
    largest part of them that is (n, n // 2, ...), else one: that choice, with ``budget`` as the free memory."""
    elements = clip.geometry.latent_elements(clip)  # the sampler's packed latent (LTXAV: video and audio)
    for i in range(1, share + 1):
        k = share // i
        if patcher.model.memory_required([k * batch, 1, elements]) * 1.5 < budget:
            return k
    return 1


def plan_setting(degrees: Degrees, passes, per_forward: int) -> str:
    """The degrees and the passes a forward holds, as the planner's log line and refusal say them."""
    return f"{degrees.describe()}; {passes.describe()}, {per_forward} in each worker's forward"


def check_memory(patcher, latent, degrees, budget, infos=(), passes=1, lean=None) -> memory_plan.Estimate:
    """Refuse a run on ``latent`` whose predicted per-worker peak exceeds ``budget`` bytes, saying what
    would fit. ``passes``: the job's guidance passes (``guidance_passes.Passes``; an int: one call of that
    many a step): a worker's forward holds its share of the largest call. ``lean``: planned with the lean
    attention (None: when it is on, ``LTXAV_PARALLEL_LEAN_ATTENTION``)."""
    return fit(patcher, latent, degrees, budget, infos, passes, lean)[0]


def needs_lean_attention(patcher, latent, budget, infos=(), passes=1) -> bool:
    """One GPU in ComfyUI's process: whether the clip needs the lean attention, that is whether ComfyUI's own
    attention's plan leaves less than ``memory_plan.EDGE_BYTES`` of ``budget`` (where it fits, the run is
    stock's forward exactly, at stock's speed: the lean attention's ranges cost time on some models, 11 % a
    step on a GGUF Q8_0 one at 897 frames, bench/README.md)."""
    if not lean_attention.enabled():
        return False
    plain = fit(patcher, latent, Degrees(1), budget, infos, passes, lean=False, refuse=False)[0]
    return plain.total + memory_plan.EDGE_BYTES > budget


def fit(patcher, latent, degrees, budget, infos=(), passes=1, lean=None,
        refuse=True) -> tuple[memory_plan.Estimate, int]:
    """``check_memory``'s estimate, and the guidance passes a worker's forward holds (``refuse`` False: the
    estimate whether it fits or not)."""
    dm = patcher.get_model_object("diffusion_model")
    family = models.family_of(dm, NODE)
    dims = family.plan_dims(dm, compute_dtype=patcher.model.get_dtype_inference())
    clip, batch = family.latent_clip(latent)
    options = patcher.model_options.get("transformer_options") or {}
    chunking = ffn_chunking.ChunkSettings.from_options(options)
    ffn = 1 if chunking is None else None if chunking.auto else chunking.num_chunks  # None: auto
    # per-token timesteps (image-to-video, guides) come from the conditioning too: always count them;
    # workers that stream the weights keep only the blocks in use on the GPU
    streaming = model_streams(patcher, infos)
    passes = guidance_passes.Passes.of(passes)
    terms = parallel_kinds.plan_terms(degrees, passes)  # each parallel kind's part of one worker's forward
    share = terms.pop("share")  # CFG-parallel's split of the largest call
    per_forward = passes_per_forward(patcher, clip, batch, share, budget)
    # NCCL's buffers: one set per peer the worker exchanges with (gloo's stay in host memory)
    nccl_peers = degrees.world - 1 if any(i.get("backend") == "nccl" for i in infos) else 0
    lean = lean_attention.enabled() if lean is None else lean
    kw = dict(ffn_chunks=ffn, sampler=True, batch=batch * per_forward, per_token_timesteps=True,
              streaming=streaming, lean=lean, nccl_peers=nccl_peers,
              lean_value=lean and lean_attention.values_in_place(dm, family, options), **terms)
    est = memory_plan.estimate(dims, clip, **kw)
    gib = memory_plan.GIB
    if not refuse:
        return est, per_forward
    if est.total <= budget:
        if budget - est.total < memory_plan.EDGE_BYTES:
            log.warning("%s: the plan (%.2f GiB) leaves %.2f GiB of the %.2f GiB free: at the card's edge, where "
                        "clips ran out of memory in stock ComfyUI too (the allocator's pool comes on top); if "
                        "this one does, shorten input 'latent_image' or raise input 'gpus'", NODE,
                        est.total / gib, (budget - est.total) / gib, budget / gib)
        return dataclasses.replace(est, note=plan_setting(degrees, passes, per_forward)), per_forward
    stride = clip.geometry.space_stride
    size = f"{clip.latent_width * stride}x{clip.latent_height * stride}"
    fits = 0  # the longest length that fits with as many passes a forward as ComfyUI would batch there
    for k in sorted({share // i for i in range(1, share + 1)}):
        longest = memory_plan.largest_latent_frames(budget, dims, clip, **{**kw, "batch": batch * k})
        if longest and passes_per_forward(patcher, clip.with_latent_frames(longest), batch, share, budget) <= k:
            fits = max(fits, longest)
    ulysses_only = {k: v for k, v in kw.items() if k not in ("ring", "world")}  # it tries each world
    more = memory_plan.smallest_world(budget, dims, clip, max_world=64, video_heads=family.video_heads(dm),
                                      **ulysses_only)
    device = infos[0]["device"] if infos else "each worker"
    if fits:
        advice = [f"at {size} with {degrees.world} GPUs the longest video that fits is "
                  f"{clip.geometry.frames(fits)} frames"]
    else:
        fixed = est.parts["weights"] + est.parts["weight casts"] + est.parts["fixed"]
        what = "the weights ComfyUI keeps on the GPU while streaming the rest" if streaming else "the weights"
        advice = [f"{what} and fixed buffers alone take {fixed / gib:.2f} GiB: use fp8 weights, GPUs with more "
                  "memory, or free memory on them"]
    if more:
        cfg = f"cfg-parallel {degrees.cfg} x " if degrees.cfg > 1 else ""
        advice.append(f"{clip.frames} frames need gpus={more * degrees.cfg} ({cfg}ulysses_degree={more})")
    if ffn == 1:
        with_chunker = memory_plan.estimate(dims, clip, **{**kw, "ffn_chunks": None})
        if with_chunker.total <= budget:
            advice.append("or add the LTX FFN Chunker before this node")
    raise ValueError(f"{NODE}: a {clip.frames}-frame {size} video needs about {est.total / gib:.2f} GiB per worker "
                     f"({plan_setting(degrees, passes, per_forward)}: {est.describe()}), but {device} has "
                     f"{budget / gib:.2f} GiB for it; " + "; ".join(advice)
                     + ". Shorten input 'latent_image' or raise input 'gpus'.")
