"""Ranks as (t, p, s) coordinates in Megatron's default order "tp-cp-ep-dp-pp": tp varies fastest,
then ep, then pp. The dense part of a stage is replicated over its EP ranks (they are the data-
parallel replicas the expert-parallel group is folded over), so world = tp·ep·pp."""
from __future__ import annotations

import dataclasses

import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Grid:
    tp: int
    ep: int
    pp: int

    @property
    def world(self) -> int:
        return self.tp * self.ep * self.pp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """rank -> (t, p, s)."""
        return rank % self.tp, (rank // self.tp) % self.ep, rank // (self.tp * self.ep)

    def rank(self, t: int, p: int, s: int) -> int:
        return t + self.tp * (p + self.ep * s)


@dataclasses.dataclass
class Groups:
    tp: object  # the process group of my TP peers (same p, s), or None when tp == 1
    ep: object  # my EP peers (same t, s), or None when ep == 1
    tp_ranks: list[int]
    ep_ranks: list[int]


def make_groups(grid: Grid, rank: int) -> Groups:
    """Every rank creates every group in the same order (torch.distributed requires it)."""
    mine = grid.coords(rank)
    tp_group = ep_group = None
    tp_ranks = ep_ranks = [rank]
    for s in range(grid.pp):
        for p in range(grid.ep):
            ranks = [grid.rank(t, p, s) for t in range(grid.tp)]
            g = dist.new_group(ranks) if grid.tp > 1 else None
            if rank in ranks:
                tp_group, tp_ranks = g, ranks
    for s in range(grid.pp):
        for t in range(grid.tp):
            ranks = [grid.rank(t, p, s) for p in range(grid.ep)]
            g = dist.new_group(ranks) if grid.ep > 1 else None
            if rank in ranks:
                ep_group, ep_ranks = g, ranks
    assert grid.coords(rank) == mine
    return Groups(tp_group, ep_group, tp_ranks, ep_ranks)
