"""The trainer's entry to the engines: join the process group, wrap the model, build the optimizer.

``engine.kind`` picks the backend when the run's objects are built; the training step then sees
only an optimizer and a :class:`myriad.train.step.GradSync`:

* ``none``: the model as is, torch's AdamW; one process only.
* ``myriad``: :func:`myriad.engine.engine.apply` (chunks, offload, expert parallelism).
* ``fsdp2``: PyTorch ``fully_shard`` per block (``myriad.engine.fsdp2``), optionally offloaded.

With ``torchrun`` (``WORLD_SIZE`` > 1) each process joins the group first; on CUDA it takes GPU
``LOCAL_RANK``. The model's ``state_dict``/``load_state_dict`` keep working on a partitioned model
(hooks gather the chunks around them; hot-start loads through them); the trainer's checkpoints of
a ``myriad`` run are per-rank shards instead (``myriad.train.shard_checkpoint``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from myriad.engine.comm import Comm, collective_device_type, init_distributed, local_device
from myriad.engine.config import EngineConfig
from myriad.errors import UserError
from myriad.train.config import TrainConfig

if TYPE_CHECKING:  # imported when used: torch.distributed.fsdp is slow to import
    from myriad.engine.fsdp2_experts import FSDP2Experts

T = TypeVar("T")


@dataclass
class Runtime:
    """The process group and device one run trains on."""

    cfg: EngineConfig
    comm: Comm
    device: torch.device

    @property
    def rank(self) -> int:
        return self.comm.rank

    def stream_seed(self, seed: int) -> int:
        """Each rank draws its own batches; rank 0 keeps the single-process stream."""
        return seed + 1_000_003 * self.comm.rank


def rank_dir(out_dir: Path) -> Path:
    """Where this process writes: ``out_dir`` for rank 0 (or no torchrun), else
    ``out_dir/rank-N``, so ranks never write the same file (data cache, metrics, trainer state)."""
    rank = int(os.environ.get("RANK", "0"))
    return out_dir if rank == 0 else out_dir / f"rank-{rank}"


def rank0_first(fn: Callable[[Path], T], out_dir: Path, cfg: EngineConfig) -> T:
    """``fn(out_dir)`` on rank 0, then ``fn(rank 0's directory)`` on the others (so they reuse,
    e.g., rank 0's tokenizer and data cache instead of making their own). One process: just
    ``fn(out_dir)``."""
    comm = init_distributed(cfg.backend, cfg.timeout_s)
    if not comm.active:
        return fn(out_dir)
    if comm.rank == 0:
        result = fn(out_dir)
        comm.barrier()
        return result
    comm.barrier()
    return fn(out_dir.parent)


def start(cfg: EngineConfig, device: torch.device) -> Runtime:
    """Join the process group ``torchrun`` set up (if any) and pick this rank's device."""
    cfg.validate()
    comm = init_distributed(cfg.backend, cfg.timeout_s)
    if comm.active and cfg.kind == "none":
        raise UserError(
            f"{comm.world} processes but engine.kind is 'none'; set engine.kind=myriad or fsdp2"
        )
    return Runtime(cfg, comm, local_device(comm, device))


def leave() -> None:
    """After a successful run under ``torchrun``: tear the process group down while the
    interpreter is fully alive, as PyTorch asks (not after a failure: peers may still be inside a
    collective, and destroying would hang)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(
    runtime: Runtime, model: nn.Module, train: TrainConfig, run_forward: Callable[[], Any]
) -> tuple[torch.optim.Optimizer, Any]:
    """Apply the chosen engine to ``model``; returns its optimizer and the step's ``GradSync``
    (None for ``none``: the step's own local one)."""
    kind = runtime.cfg.kind
    betas = (train.beta1, train.beta2)
    if kind == "myriad":
        from myriad.engine.engine import apply

        engine = apply(
            model, runtime.cfg, comm=runtime.comm, device=runtime.device, run_forward=run_forward
        )
        optimizer = engine.build_optimizer(
            lr=train.lr, betas=betas, eps=train.eps, weight_decay=train.weight_decay
        )
        install_state_dict_hooks(model, engine)
        return optimizer, engine
    from myriad.train.optim import build_optimizer

    if kind == "fsdp2":
        return _wrap_fsdp2(runtime, model, train)
    return build_optimizer(model, train, runtime.device), None


def _wrap_fsdp2(runtime: Runtime, model: nn.Module, train: TrainConfig):
    from myriad.engine import fsdp2, fsdp2_experts
    from myriad.train.optim import build_optimizer

    if not dist.is_initialized():  # one process: FSDP2 still needs a (1-rank) group
        raise UserError("engine.kind=fsdp2 needs torchrun (or a process group), even for 1 rank")
    from myriad.engine.precision import fsdp2_dtypes

    cfg = runtime.cfg
    experts = None
    if cfg.expert_parallel:
        experts = fsdp2_experts.split(model, runtime.comm, cfg.expert_parallel_size)
    mesh = fsdp2.build_mesh()
    param_dtype, reduce_dtype = fsdp2_dtypes(cfg.param_dtype, cfg.reduce_dtype)
    fsdp2.apply_fsdp2(
        model,  # type: ignore[arg-type]
        mesh,
        cpu_offload=cfg.cpu_offload,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        expert_mesh=experts.edp_mesh if experts is not None else None,
    )
    install_dtensor_state_dict_hooks(model, experts)
    opt_device = torch.device("cpu") if cfg.cpu_offload else runtime.device
    return build_optimizer(model, train, opt_device), FSDP2Sync(runtime.comm, model, experts)


class FSDP2Sync:
    """``GradSync`` for FSDP2: its hooks reduce gradients; the norm is a DTensor's. ``experts``:
    the expert-parallel layout, which checkpoints and ``state_dict`` need."""

    def __init__(self, comm: Comm, model: nn.Module, experts: FSDP2Experts | None = None) -> None:
        self.comm, self.world = comm, comm.world
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.experts = experts

    def finish_backward(self) -> None:
        pass

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        from myriad.engine import fsdp2

        return fsdp2.clip_grad_norm_(self.params, max_norm)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(t.clone())


def install_state_dict_hooks(model: nn.Module, engine: Any) -> None:
    """``state_dict`` returns whole tensors (gathered; experts from every rank); ``load_state_dict``
    gathers the chunks, lets torch copy into them, and keeps this rank's slices, taken from the
    loaded values themselves so fp32 masters stay exact under ``engine.param_dtype = bfloat16``.

    Both are collectives (every rank calls them together, as the trainer's checkpoints do) and
    hold the whole model in memory for a moment: the path for small and medium models; large
    ones use ``myriad.engine.shards``.
    """
    aliases = dict(model.named_parameters(remove_duplicate=False))
    canonical = {p: n for n, p in model.named_parameters()}
    engine.gather_state_dict = True  # False inside ``buffers_only_state_dict``

    def after_state_dict(module, state_dict, prefix, local_metadata):  # noqa: ARG001
        if not engine.gather_state_dict:
            return
        full = engine.full_state_dict()
        for name, p in aliases.items():
            state_dict[prefix + name] = full[canonical[p]]

    loaded: dict[nn.Parameter, torch.Tensor] = {}

    def before_load(module, state_dict, prefix, *args):  # noqa: ARG001
        engine.synchronize()  # no overlapped update may write a shard after the load
        for chunk in engine.store.chunks:
            engine.store.gather(chunk)
        for p, rows in engine.expert_rows.items():  # keep this rank's experts' rows only
            key = prefix + canonical[p]
            if key in state_dict:
                state_dict[key] = state_dict[key][rows[0] : rows[0] + p.shape[0]]
        for p, name in canonical.items():
            if prefix + name in state_dict:
                loaded[p] = state_dict[prefix + name]

    def after_load(module, incompatible):  # noqa: ARG001
        with torch.no_grad():
            for chunk in engine.store.chunks:
                lo, hi = chunk.shard_range()
                for slot in chunk.slots:  # this rank's part of each loaded parameter
                    start, end = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
                    value = loaded.get(slot.param)
                    if value is None or start >= end:
                        continue
                    flat = value.reshape(-1)[start - slot.offset : end - slot.offset]
                    chunk.shard_S.data[start - lo : end - lo].copy_(flat)
                engine.store.release(chunk)
                if chunk.params_in_grad:  # the parameters there are the old ones
                    engine.store.forget_params(chunk)
        loaded.clear()

    model.register_state_dict_post_hook(after_state_dict)
    model.register_load_state_dict_pre_hook(before_load)
    model.register_load_state_dict_post_hook(after_load)


def sharding_engine(sync: Any) -> Any:
    """The ``myriad`` engine behind a training step's ``GradSync``, else None."""
    from myriad.engine.engine import Engine

    return sync if isinstance(sync, Engine) else None


@dataclass
class CheckpointParts:
    """What every rank writes into, and reads from, one shared step directory
    (``myriad.train.shard_checkpoint``): the ``myriad`` engine's shards, or FSDP2's
    ``torch.distributed.checkpoint`` files. Both reshard to any number of ranks on reading."""

    comm: Comm
    device: torch.device  # where the ranks' agreement flags are summed
    write: Callable[[Path], None]  # a collective
    read: Callable[[Path], None]  # a collective
    holds: Callable[[Path], bool]  # whether a step directory has these parts


def checkpoint_parts(
    sync: Any, model: nn.Module, optimizer: torch.optim.Optimizer
) -> CheckpointParts | None:
    """The per-rank parts of a run's checkpoints; None for a plain one-process model."""
    from myriad.engine import fsdp2, shards
    from myriad.engine.dcp_weights import DCP_DIR
    from myriad.train import checkpoint

    engine = sharding_engine(sync)
    if engine is not None:

        def write(directory: Path) -> None:
            with buffers_only_state_dict(engine):
                shards.save_shards(engine, directory)

        def holds(directory: Path) -> bool:
            return checkpoint.shard_world(directory) is not None

        read = partial(shards.load_shards, engine)
        return CheckpointParts(engine.comm, engine.device, write, read, holds)
    if isinstance(sync, FSDP2Sync):

        def write_dcp(directory: Path) -> None:
            fsdp2.save_sharded(model, optimizer, directory, sync.experts)

        def holds_dcp(directory: Path) -> bool:
            return (directory / DCP_DIR).is_dir()

        read = partial(fsdp2.load_sharded, model, optimizer, experts=sync.experts)
        flags = torch.device(collective_device_type())
        return CheckpointParts(sync.comm, flags, write_dcp, read, holds_dcp)
    return None


@contextmanager
def buffers_only_state_dict(engine: Any) -> Iterator[None]:
    """Within this block ``state_dict()`` gathers nothing and is no collective: its parameter
    entries are released views that must not be read (only the buffers are meaningful). For
    ``shards.save_shards``, which takes just the buffers from it, so that saving shards never
    holds the whole model in one process."""
    engine.gather_state_dict = False
    try:
        yield
    finally:
        engine.gather_state_dict = True


def install_dtensor_state_dict_hooks(model: nn.Module, experts: FSDP2Experts | None = None) -> None:
    """FSDP2: ``state_dict`` gives whole tensors (``full_tensor``, a collective) and
    ``load_state_dict`` takes them (each rank keeps its shard), so the trainer's checkpoints are
    the same consolidated files as without an engine. ``experts`` (``fsdp2_experts``): expert
    weights are gathered from, and cut to, this rank's expert-parallel rows as well."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters(remove_duplicate=False))

    def after_state_dict(module, state_dict, prefix, local_metadata):  # noqa: ARG001
        done: dict[int, torch.Tensor] = {}
        for name, p in params.items():
            key = prefix + name
            if isinstance(p, DTensor) and key in state_dict:
                if id(p) not in done:
                    if experts is not None and name in experts.rows:
                        done[id(p)] = experts.whole(name, p).cpu()
                    else:
                        done[id(p)] = p.full_tensor().detach().cpu()
                state_dict[key] = done[id(p)]

    def before_load(module, state_dict, prefix, *args):  # noqa: ARG001
        for name, p in params.items():
            key = prefix + name
            value = state_dict.get(key)
            if isinstance(p, DTensor) and value is not None and not isinstance(value, DTensor):
                if experts is not None and name in experts.rows:
                    state_dict[key] = experts.local(name, value, p)
                    continue
                full = value.to(p.device_mesh.device_type, p.dtype)
                state_dict[key] = distribute_tensor(full, p.device_mesh, p.placements)

    model.register_state_dict_post_hook(after_state_dict)
    model.register_load_state_dict_pre_hook(before_load)
