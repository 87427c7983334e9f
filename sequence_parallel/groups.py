"""The ranks of a parallel forward and their process groups: the degrees (Ulysses x ring), their
checks, and torch.distributed + xfuser's groups for one process."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .. import xfuser_compat


@dataclasses.dataclass(frozen=True)
class Degrees:
    """Sequence-parallel degrees: ``ulysses * ring`` ranks."""

    ulysses: int
    ring: int = 1

    @property
    def world(self) -> int:
        return self.ulysses * self.ring


def check_degrees(degrees: Degrees, world: int, video_heads: int, node: str) -> None:
    """Raise a message naming ``node`` when the degrees cannot run ``world`` ranks."""
    if degrees.ulysses < 1 or degrees.ring < 1:
        raise ValueError(f"{node}: ulysses_degree and ring_degree must be >= 1 "
                         f"(got {degrees.ulysses} and {degrees.ring}).")
    if degrees.world != world:
        raise ValueError(f"{node}: ulysses_degree x ring_degree = {degrees.ulysses} x {degrees.ring} = "
                         f"{degrees.world}, but {world} GPUs are used; pick degrees whose product is {world} "
                         f"(e.g. ulysses_degree={world}, ring_degree=1).")
    if video_heads % degrees.ulysses:
        fits = [d for d in range(1, world + 1) if world % d == 0 and video_heads % d == 0]
        raise ValueError(f"{node}: ulysses_degree={degrees.ulysses} does not divide the model's {video_heads} "
                         f"video attention heads; use a ulysses_degree from {fits} and put the rest in ring_degree.")



def init_process_groups(rank: int, world: int, degrees: Degrees, backend: str, init_method: str,
                        store=None) -> None:
    """torch.distributed + xfuser's groups (sequence parallel = Ulysses x ring) for this process.
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
    xf.parallel_state.initialize_model_parallel(sequence_parallel_degree=world, ulysses_degree=degrees.ulysses,
                                                ring_degree=degrees.ring, backend=backend)


def destroy_process_groups() -> None:
    xf = xfuser_compat.load()
    if xf.parallel_state.model_parallel_is_initialized():
        xf.parallel_state.destroy_model_parallel()
    xf.parallel_state.destroy_distributed_environment()


