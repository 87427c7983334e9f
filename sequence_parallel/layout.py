"""How a sharded sequence is laid out over W ranks: the token count padded to a multiple of W at the
end, rank r holding padded tokens [r*local, (r+1)*local); taking this rank's slice and gathering all
of them back without the padding."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """``total`` tokens padded to ``local * world``; rank r holds padded tokens [r*local, (r+1)*local).

    Requires every rank to hold at least one real token (``total > (world - 1) * local``)."""

    total: int
    world: int
    rank: int

    @property
    def local(self) -> int:
        return math.ceil(self.total / self.world)

    @property
    def start(self) -> int:
        return self.rank * self.local

    @property
    def real(self) -> int:
        """Real (non-padding) tokens on this rank."""
        return max(0, min(self.local, self.total - self.start))

    @property
    def pad(self) -> int:
        return self.local * self.world - self.total

    def check(self, node: str = "Sequence parallel", unit: str = "GPUs") -> None:
        """A message when a rank would hold no real token; ``unit``: what the ranks are (GPUs, CPU workers)."""
        last_real = self.total - (self.world - 1) * self.local
        if last_real < 1:
            raise ValueError(f"{node}: the video has {self.total} tokens, too few to split over {self.world} {unit} "
                             f"(the last one would get none); use fewer {unit} (input 'gpus') or a longer or larger "
                             "video.")

    def take(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of ``t`` along ``dim``, padded to ``local`` by repeating its last element."""
        part = t.narrow(dim, self.start, self.real)
        if self.real == self.local:
            return part
        fill = part.narrow(dim, self.real - 1, 1)
        shape = list(t.shape)
        shape[dim] = self.local - self.real
        return torch.cat([part, fill.expand(shape)], dim=dim)

    def gather(self, t: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
        """All ranks' slices, concatenated along ``dim`` without the padding."""
        if self.world == 1:  # no collective: NCCL would set up a communicator when the card is fullest
            return t.narrow(dim, 0, self.total)
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.total)


