"""The ranks of a parallel run and their process groups: the degrees (cfg x Ulysses x ring), their
checks, and torch.distributed + xfuser's groups for one process.

Ranks are laid out as xfuser lays them out (``tp-sp-pp-cfg-dp``): the ``ulysses * ring`` ranks of one
sequence-parallel group are consecutive, and the cfg degree repeats that group; xfuser's CFG group
joins the ranks that hold the same sequence shard in each repeat."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .. import xfuser_compat


@dataclasses.dataclass(frozen=True)
class Degrees:
    """``cfg`` groups of ``ulysses * ring`` sequence-parallel ranks: ``cfg * ulysses * ring`` ranks."""

    ulysses: int
    ring: int = 1
    cfg: int = 1

    @property
    def sequence(self) -> int:
        """Ranks that split one forward's sequence."""
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.cfg * self.sequence

    def describe(self) -> str:
        """As the log and the node's summary say it: ``[cfg C x ]Ulysses U x ring R``."""
        return (f"cfg {self.cfg} x " if self.cfg > 1 else "") + f"Ulysses {self.ulysses} x ring {self.ring}"


def check_degrees(degrees: Degrees, world: int, video_heads: int, node: str, unit: str = "GPUs") -> None:
    """Raise a message naming ``node`` when the degrees cannot run ``world`` ranks (``unit``: what a rank is)."""
    if degrees.ulysses < 1 or degrees.ring < 1 or degrees.cfg < 1:
        raise ValueError(f"{node}: ulysses_degree, ring_degree and the cfg-parallel degree must be >= 1 "
                         f"(got {degrees.ulysses}, {degrees.ring} and {degrees.cfg}).")
    if degrees.world != world:
        cfg = f"cfg {degrees.cfg} x " if degrees.cfg > 1 else ""
        raise ValueError(f"{node}: {cfg}ulysses_degree x ring_degree = {cfg}{degrees.ulysses} x {degrees.ring} = "
                         f"{degrees.world}, but {world} {unit} are used; pick degrees whose product is {world} "
                         f"(e.g. ulysses_degree={world // degrees.cfg or world}, ring_degree=1).")
    if video_heads % degrees.ulysses:
        sp = world // degrees.cfg
        fits = [d for d in range(1, sp + 1) if sp % d == 0 and video_heads % d == 0]
        raise ValueError(f"{node}: ulysses_degree={degrees.ulysses} does not divide the model's {video_heads} "
                         f"video attention heads; use a ulysses_degree from {fits} and put the rest in ring_degree.")


def init_process_groups(rank: int, world: int, degrees: Degrees, backend: str, init_method: str,
                        store=None) -> None:
    """torch.distributed + xfuser's groups (cfg x sequence parallel = Ulysses x ring) for this process.
    With ``store`` (a ``TCPStore`` the caller made) the ranks meet there and ``init_method`` only
    names it."""
    xf = xfuser_compat.load()
    if not dist.is_initialized():
        if store is None:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    local = torch.cuda.current_device() if torch.cuda.is_available() else rank  # the device xfuser's groups name
    xf.parallel_state.init_distributed_environment(world_size=world, rank=rank, backend=backend,
                                                   distributed_init_method=init_method, local_rank=local)
    init_degree_groups(degrees, backend)


def init_degree_groups(degrees: Degrees, backend: str) -> None:
    """xfuser's groups for ``degrees`` on the initialised world (every rank calls it)."""
    xf = xfuser_compat.load()
    xf.parallel_state.initialize_model_parallel(classifier_free_guidance_degree=degrees.cfg,
                                                sequence_parallel_degree=degrees.sequence,
                                                ulysses_degree=degrees.ulysses, ring_degree=degrees.ring,
                                                backend=backend)


def regroup(degrees: Degrees, backend: str) -> None:
    """Replace xfuser's groups by those of ``degrees``, keeping the world (every rank calls it): the
    workers keep their model when a prompt needs other degrees. The groups xfuser's own destroy leaves
    (yunchang's Ulysses and ring groups, the all-ranks DiT group) go too."""
    xf = xfuser_compat.load()
    ps = xf.parallel_state
    if ps.model_parallel_is_initialized():
        sp = ps.get_sp_group()
        leftover = [getattr(sp, "ulysses_group", None), getattr(sp, "ring_group", None), getattr(ps, "_DIT", None)]
        ps.destroy_model_parallel()
        for group in {g for g in leftover if g is not None}:
            dist.destroy_process_group(group)
        ps._DIT = None
    init_degree_groups(degrees, backend)


def destroy_process_groups() -> None:
    xf = xfuser_compat.load()
    if xf.parallel_state.model_parallel_is_initialized():
        xf.parallel_state.destroy_model_parallel()
    xf.parallel_state.destroy_distributed_environment()
