"""Expert-parallel and expert data-parallel process groups (DeepSpeed-MoE / Megatron layout).

With ``engine.expert_parallel_size`` = k on N ranks, ranks form N/k *expert-parallel* (EP)
groups of k consecutive ranks (so a group can sit inside one node): within a group each rank
holds E/k experts of every MoE layer and tokens travel by all-to-all over that group only. The
ranks holding the same experts, one per EP group (``i, i+k, i+2k, ...``), form the *expert
data-parallel* (EDP) group: the expert chunks are ZeRO-partitioned across it, so expert states
are sharded over all N ranks in total. k = N is the EP group = world (EDP groups of one rank);
k = 1 splits nothing: the experts are ordinary parameters partitioned across the world.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from myriad.engine.comm import Comm
from myriad.errors import UserError


@dataclass
class ExpertGroups:
    """This rank's EP group (``ep``, size k) and EDP group (``edp``, size N/k), with the members
    of each as ranks of the world ``Comm`` (in group-rank order, as shard layouts record them)."""

    ep: Comm
    edp: Comm
    ep_members: list[int]
    edp_members: list[int]

    @property
    def size(self) -> int:
        return self.ep.world


def resolve_size(size: int, world: int, num_experts: int) -> int:
    """The EP size to use (0 means all ranks), checked against the world and the experts."""
    if size < 0:
        raise UserError(f"engine.expert_parallel_size must be >= 0, got {size}")
    k = world if size == 0 else size
    if world % k:
        raise UserError(
            f"engine.expert_parallel_size ({size}) must divide the number of processes ({world})"
        )
    if num_experts % k:
        raise UserError(
            f"engine.expert_parallel_size ({k}) must divide model.moe.num_experts ({num_experts})"
        )
    return k


def expert_groups(comm: Comm, size: int) -> ExpertGroups:
    """Build the EP and EDP groups of size ``size`` (k) over ``comm``; a collective call.

    Every rank creates every group, in the same order, as ``dist.new_group`` requires, so for
    1 < k < N ``comm`` must be the default group (every process calls this). A group of the
    whole ``comm`` reuses it, and a group of one rank needs no process group.
    """
    world, k, rank = comm.world, size, comm.rank
    ep_members = list(range(rank - rank % k, rank - rank % k + k))
    edp_members = list(range(rank % k, world, k))
    ep_handle = edp_handle = None
    if 1 < k < world:
        assert comm.group is None, "expert groups are built over the default process group"
        for first in range(0, world, k):  # the EP groups
            group = dist.new_group(list(range(first, first + k)))
            ep_handle = group if first == ep_members[0] else ep_handle
        for first in range(k):  # the EDP groups
            group = dist.new_group(list(range(first, world, k)))
            edp_handle = group if first == edp_members[0] else edp_handle
    return ExpertGroups(
        ep=_sub(comm, ep_members, ep_handle),
        edp=_sub(comm, edp_members, edp_handle),
        ep_members=ep_members,
        edp_members=edp_members,
    )


def _sub(comm: Comm, members: list[int], handle: object) -> Comm:
    """The ``Comm`` of ``members`` (ranks of ``comm``): ``comm`` itself, one rank, or ``handle``."""
    if len(members) == comm.world:
        return comm
    if len(members) == 1:
        return Comm(0, 1, None, comm.timeout_s)
    return Comm(members.index(comm.rank), len(members), handle, comm.timeout_s)
