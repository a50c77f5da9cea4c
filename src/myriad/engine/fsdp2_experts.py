"""Expert parallelism under the FSDP2 backend (``engine.kind = "fsdp2"`` with ``expert_parallel``).

The layout is the ``myriad`` engine's (``myriad.engine.groups``): N ranks form N/k EP groups of
k consecutive ranks; each rank keeps E/k experts of every MoE layer and tokens reach them by
all-to-all over its EP group (``myriad.engine.expert``). FSDP2 then shards each MoE layer's
expert weights over its expert data-parallel (EDP) group, the N/k ranks that hold the same
experts, and every other parameter over the world (``fsdp2.apply_fsdp2``).

Both groups are the dimensions of one ``DeviceMesh`` named ("ep", "edp"): the transpose of the
row-major (N/k, k) grid of ranks, so that its "ep" groups are consecutive ranks and its "edp"
groups strided ones. The mesh has a second use, checkpoints: an expert weight is a ``DTensor``
of E/k rows on the EDP mesh, under the same name and with different contents on every EP rank,
which ``torch.distributed.checkpoint`` would take for replicas of one tensor.
:meth:`FSDP2Experts.global_view` presents it, sharing its storage, as the whole (E, ...) tensor
on the ("ep", "edp") mesh, rows split first by EP rank and then by EDP rank, so every expert is
written once and a checkpoint reloads at any world or EP size.

Gradients: the all-to-all backward sums a local expert's gradient over the k ranks of its EP
group, FSDP's reduce-scatter averages over the N/k of its EDP group, and ``grad_scale`` = 1/k
(``keep_local_experts``) makes it the mean over all N ranks, like every other gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from myriad.engine.comm import Comm, collective_device_type
from myriad.engine.expert import expert_parallel_size, keep_local_experts, moe_layers


@dataclass
class FSDP2Experts:
    """This rank's share of the experts: the ("ep", "edp") mesh, the EP group, and the expert
    parameters by name with the rows of their whole tensors (E)."""

    mesh: DeviceMesh
    ep: Comm
    rows: dict[str, int]

    @property
    def edp_mesh(self) -> DeviceMesh:
        return self.mesh["edp"]

    def global_view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """An expert parameter's (or Adam moment's) shard as part of the whole tensor, sharing
        its storage; any other tensor as it is."""
        if name not in self.rows or not isinstance(t, DTensor):
            return t
        shape = torch.Size([self.rows[name], *t.shape[1:]])
        with torch.no_grad():
            local = t.to_local().detach()
        stride = torch.empty(shape, device="meta").stride()
        placements = [Shard(0), Shard(0)]
        return DTensor.from_local(
            local, self.mesh, placements, run_check=False, shape=shape, stride=stride
        )

    def whole(self, name: str, p: DTensor) -> torch.Tensor:
        """The whole (E, ...) tensor of an expert parameter on every rank (a collective)."""
        part = p.full_tensor().detach()  # this EP rank's E/k rows, gathered over the EDP group
        out = part.new_empty(self.rows[name], *part.shape[1:])
        self.ep.all_gather(out, part)
        return out

    def local(self, name: str, value: torch.Tensor, p: DTensor) -> DTensor:
        """This rank's shard of ``p`` from ``value``, the whole (E, ...) tensor."""
        per = self.rows[name] // self.ep.world
        rows = value[self.ep.rank * per : (self.ep.rank + 1) * per]
        rows = rows.to(p.device_mesh.device_type, p.dtype)
        return distribute_tensor(rows, p.device_mesh, p.placements)


def split(model: nn.Module, comm: Comm, size: int) -> FSDP2Experts | None:
    """Keep this rank's experts of every MoE layer (``engine.expert_parallel_size`` = ``size``,
    0: all ranks) before ``fully_shard``; None when the EP size is 1 (nothing to split). A
    collective: every rank builds the mesh's process groups."""
    layers = moe_layers(model)
    k = expert_parallel_size(layers, comm.world, size)
    if k == 1:
        return None
    device_type = collective_device_type()
    grid = torch.arange(comm.world).view(comm.world // k, k).t()
    mesh = DeviceMesh(device_type, grid, mesh_dim_names=("ep", "edp"))
    ep_mesh = mesh["ep"]
    ep = Comm(ep_mesh.get_local_rank(), k, ep_mesh.get_group(), comm.timeout_s)
    kept = keep_local_experts(layers, ep)
    rows = {name: kept[p][1] for name, p in model.named_parameters() if p in kept}
    return FSDP2Experts(mesh, ep, rows)
