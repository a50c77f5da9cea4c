"""The FSDP2 backend: PyTorch's ``fully_shard`` applied to a ``MoETransformerLM`` from outside.

Each Transformer block becomes one FSDP unit (its parameters all-gathered just before its forward
and backward, resharded after), then the root takes what is left: the embedding (tied to the LM
head), the final norm. With expert parallelism each MoE layer is a unit of its own, holding only
its experts, sharded over the expert data-parallel mesh (``fsdp2_experts``).
``CPUOffloadPolicy`` keeps the sharded parameters, gradients and hence the optimizer states in
host memory; the optimizer step then runs on the CPU.

Works on CPU with gloo as well as on CUDA with NCCL (tests/test_engine_fsdp2.py runs 2 gloo
ranks). What a trainer needs besides ``apply_fsdp2``: build the optimizer *after* it (parameters
become ``DTensor`` shards), clip with :func:`clip_grad_norm_` (the norm is a ``DTensor``), sum
the routers' expert loads over ranks with :func:`all_reduce_expert_loads` before
``update_router_biases`` (the selection biases are replicated and must move identically), and
checkpoint with :func:`save_sharded` / :func:`load_sharded` (every rank its shards, through
``torch.distributed.checkpoint``, so a run resumes on any number of ranks; single-process readers
assemble whole tensors from them with ``dcp_weights``); with expert parallelism, pass the
``FSDP2Experts`` to the last two.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from myriad.engine.comm import collective_device_type
from myriad.engine.dcp_weights import DCP_DIR
from myriad.engine.fsdp2_experts import FSDP2Experts
from myriad.errors import UserError
from myriad.model import MoETransformerLM
from myriad.model.moe import MoEFeedForward


def build_mesh() -> DeviceMesh:
    """A 1-D data-parallel mesh over every rank of the initialised default process group.

    The device type follows the backend: NCCL meshes live on CUDA, gloo meshes on the CPU.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed.init_process_group() first")
    device_type = collective_device_type()
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp",))


def apply_fsdp2(
    model: MoETransformerLM,
    mesh: DeviceMesh,
    *,
    cpu_offload: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    expert_mesh: DeviceMesh | None = None,
) -> MoETransformerLM:
    """Shard ``model`` in place across ``mesh``: per block, then the root; returns the model.

    Args:
        cpu_offload: keep sharded parameters and gradients in (pinned, when CUDA exists) host
            memory; the optimizer built afterwards then steps on the CPU.
        param_dtype: dtype the gathered parameters are computed in (e.g. ``torch.bfloat16``);
            None keeps the stored dtype. The sharded master copy keeps the stored dtype.
        reduce_dtype: dtype of the gradient reduce-scatter; None follows ``param_dtype``.
        reshard_after_forward: free gathered parameters after each block's forward (ZeRO-3);
            False keeps them until backward (ZeRO-2-like: more memory, one gather less).
        expert_mesh: with expert parallelism (``fsdp2_experts.split`` ran first), the expert
            data-parallel mesh: each MoE layer becomes a unit sharded over it, holding only its
            expert weights (its router and shared experts are units on ``mesh``).
    """
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else None
    policy = offload or OffloadPolicy()
    # Inputs are not cast: the blocks' rotary tables stay fp32, as with the myriad engine (the
    # same recipe keys compute the same numbers; tests/test_engine_precision.py).
    mp_policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
    )
    shard = partial(
        fully_shard,
        reshard_after_forward=reshard_after_forward,
        mp_policy=mp_policy,
        offload_policy=policy,
    )
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            # A cached per-layer expert-gradient buffer would keep an unsharded gradient alive
            # on every rank (the myriad engine turns it off too, so both compute the same).
            module.reuse_cpu_grad_buffers = False
            if expert_mesh is not None:
                for part in (module.router, module.shared):
                    if part is not None:
                        shard(part, mesh=mesh)
                shard(module, mesh=expert_mesh)  # what is left: the expert weights
    for block in model.blocks:
        shard(block, mesh=mesh)
    # The root's parameters (embedding = LM head, final norm) are needed first in forward and
    # last in backward: keeping them gathered after forward saves one all-gather.
    fully_shard(
        model, mesh=mesh, reshard_after_forward=False, mp_policy=mp_policy, offload_policy=policy
    )
    return model


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of sharded parameters; returns the norm as a plain tensor."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if len({g.device_mesh for g in grads if isinstance(g, DTensor)}) <= 1:
        norm = nn.utils.clip_grad_norm_(parameters, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if len(sharded) < len(grads):
        raise RuntimeError("clip_grad_norm_ over several meshes needs every gradient sharded")
    return _clip_over_meshes(sharded, max_norm)


def _clip_over_meshes(grads: list[DTensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for gradients on several meshes (experts on their own): DTensor
    cannot combine their norms, but each gradient's local shards tile it exactly once over the
    world, so the squares of every rank's shards, summed over the world, give the norm."""
    device = torch.device(collective_device_type())
    with torch.no_grad():
        squares = [torch.linalg.vector_norm(g.to_local(), dtype=torch.float32) ** 2 for g in grads]
        total = torch.stack([s.to(device) for s in squares]).sum()
        dist.all_reduce(total)
        norm = total.sqrt()
        coef = float((max_norm / (norm + 1e-6)).clamp(max=1.0))
        for g in grads:
            g.mul_(coef)
    return norm.cpu()


def all_reduce_expert_loads(loads_E: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-MoE-layer token counts summed over all ranks (identical router-bias updates)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return loads_E
    summed = [load.clone() for load in loads_E]
    for load in summed:
        dist.all_reduce(load)
    return summed


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU in rank 0 (an empty dict elsewhere), for a checkpoint."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def save_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    experts: FSDP2Experts | None = None,
) -> None:
    """This rank's shards of the parameters and of the optimizer state into ``directory/dcp``
    (``torch.distributed.checkpoint``: readable by any number of ranks). A collective.
    ``experts``: expert-parallel weights, written as parts of their whole tensors."""
    shards = _shards(model)  # first: it reshards, so the parameters are the optimizer's again
    osd = get_optimizer_state_dict(model, optimizer)
    state = _global_views({"model": shards, "optim": osd}, experts)
    try:
        dcp.save(state, checkpoint_id=str(directory / DCP_DIR))
    except CheckpointException as exc:  # a BaseException, raised on every rank
        mine = exc.failures.get(dist.get_rank())
        if mine is not None:  # this rank's own error: an OSError for a full disk, say
            raise mine[0] from None
        # Another rank's failure: that rank raises it, and the save's agreement round
        # (shard_checkpoint._all_or_none) fails the checkpoint on every rank.


def load_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    experts: FSDP2Experts | None = None,
) -> None:
    """Fill this rank's parameter and optimizer shards from ``directory/dcp``, whatever number
    of ranks (and expert-parallel size) wrote it (a collective)."""
    shards = _shards(model)
    osd = get_optimizer_state_dict(model, optimizer)  # allocates the moments to load into
    state = _global_views({"model": shards, "optim": osd}, experts)  # share osd's storage
    try:
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
    except (RuntimeError, CheckpointException) as exc:  # a damaged or missing shard file
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        where = directory / DCP_DIR
        raise UserError(f"cannot read the checkpoint files in {where}: {cause}") from None
    set_optimizer_state_dict(model, optimizer, osd)


def _global_views(state: dict, experts: FSDP2Experts | None) -> dict:
    """``{"model": shards, "optim": osd}`` with expert tensors as views of their whole ones."""
    if experts is None:
        return state
    shards, osd = state["model"], state["optim"]
    moments = {
        name: {key: experts.global_view(name, v) for key, v in values.items()}
        for name, values in osd["state"].items()
    }
    return {
        "model": {name: experts.global_view(name, t) for name, t in shards.items()},
        "optim": {**osd, "state": moments},
    }


def _shards(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once, as ``DTensor`` shards) and persistent buffers, by name.

    A forward without backward (a held-out evaluation) leaves the root's parameters gathered
    (``reshard_after_forward=False``): they are resharded first, so these are the optimizer's."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    out: dict[str, torch.Tensor] = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out
