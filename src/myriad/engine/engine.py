"""``apply(model, cfg)``: partition a model's states into chunks, from outside the model.

The engine packs parameters (in order of first use) into fixed-size chunks, keeps 1/N of each
chunk per rank, installs the gather/release hooks, splits experts across ranks when expert
parallelism is on, and builds the optimizer over the owned shards. The training step talks to it
through four calls: ``finish_backward``, ``clip_grad_norm_``, ``all_reduce_sum`` and the
optimizer. With one process every collective is skipped; the code path is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from myriad.engine.chunks import Chunk, ChunkStore, pack
from myriad.engine.comm import Comm
from myriad.engine.config import EngineConfig
from myriad.engine.expert import split_experts
from myriad.engine.grad_writer import sum_of_squares
from myriad.engine.groups import ExpertGroups
from myriad.engine.hooks import Hooks, trace_first_use
from myriad.engine.hostmem import home_tensors
from myriad.engine.optim import ShardAdamW
from myriad.engine.overlap import UpdateWorker
from myriad.engine.placement import MB, MemoryManager
from myriad.engine.precision import Precision
from myriad.engine.prefetch import device_probe
from myriad.model.moe import MoEFeedForward


class Engine:
    """The partitioned model's chunk store, memory manager, hooks and collectives."""

    def __init__(
        self, model: nn.Module, cfg: EngineConfig, comm: Comm, device: torch.device
    ) -> None:
        self.model, self.cfg, self.comm, self.device = model, cfg, comm, device
        self.store: ChunkStore
        self.manager: MemoryManager
        self.hooks: Hooks
        self.expert_rows: dict[nn.Parameter, tuple[int, int]] = {}  # (first row, all rows)
        self.expert_groups: ExpertGroups | None = None  # EP / expert data-parallel groups
        self.param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.host_home: dict[int, list[torch.Tensor]] = {}  # chunk -> its payload's host copy
        self.updates = UpdateWorker()  # host payloads' updates overlapped with the next forward
        self.overlap = cfg.overlap_step == "on" or (
            cfg.overlap_step == "auto" and device.type == "cuda"
        )
        self._forward_order: list[int] = []
        self.static = cfg.placement == "static" or (
            cfg.placement == "auto" and device.type == "cuda"
        )

    # --- the training step's interface (``myriad.train.step.GradSync``) ----------------------
    @property
    def world(self) -> int:
        return self.comm.world

    def finish_backward(self) -> None:
        self.synchronize()
        self.store.finish_backward()

    def synchronize(self) -> None:
        """Wait for every overlapped update: all payloads hold this step's values."""
        self.updates.wait_all()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient L2 norm over all ranks' shards; scale gradients down to ``max_norm``.

        Each shard's sum of squares is the one the gradient writer took from the reduced
        gradient it copied in, else summed here in fp32 whatever the shard's dtype; the scaling
        happens in place, in that dtype, and only when the norm exceeds ``max_norm``."""
        self.synchronize()
        squares = self.store.grad_writer.squares
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for chunk in self.store.chunks:
            assert chunk.grad_S is not None
            part = squares.pop(chunk.index, None)
            sq += (sum_of_squares(chunk.grad_S) if part is None else part).to(self.device)
        total = self.comm.all_reduce(sq).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if coef.item() < 1.0:  # a pass over every shard (on the host too) only when it clips
            for chunk in self.store.chunks:
                assert chunk.grad_S is not None
                chunk.grad_S.mul_(coef.to(chunk.grad_S.device))
        return total

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(t.clone())

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, on the CPU, on every rank (a collective: all ranks call it).

        For tests and small models; checkpoints use ``shards.save_shards`` instead.
        """
        self.synchronize()
        out: dict[str, torch.Tensor] = {}
        for chunk in self.store.chunks:
            master_C = self.store.gather_master(chunk)  # fp32 masters, whatever param_dtype
            for slot in chunk.slots:
                flat = master_C[slot.offset : slot.offset + slot.numel].clone()
                rows = self.expert_rows.get(slot.param)
                if rows is not None:  # this rank's experts: gather its EP group's rows
                    assert self.expert_groups is not None
                    ep = self.expert_groups.ep
                    whole = flat.new_empty(slot.numel * ep.world)
                    ep.all_gather(whole, flat)
                    shape = (rows[1], *slot.shape[1:])
                    out[slot.name] = whole.view(shape).cpu()
                else:
                    out[slot.name] = flat.view(slot.shape).cpu()
            self.store.release(chunk)
        return out

    def report(self) -> dict[str, Any]:
        chunks = self.store.chunks
        return {
            "chunks": len(chunks),
            "chunk_numel": max((c.capacity for c in chunks), default=0),
            "world": self.comm.world,
            "expert_parallel_size": self.expert_groups.size if self.expert_groups else 0,
            "overlapped_updates": self.updates.submitted,
            "placement": "static" if self.static else "dynamic",
            "gather_ahead": self.store.order.depth,
            **self.store.counts,
            "async_grad_copies": self.store.grad_writer.async_copies,
            **self.manager.report(),
        }

    # --- building ----------------------------------------------------------------------------
    def build_optimizer(
        self, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
    ) -> ShardAdamW:
        decay = [c.shard_S for c in self.store.chunks if c.decay]
        no_decay = [c.shard_S for c in self.store.chunks if not c.decay]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self._chunk_of_shard = {c.shard_S: c for c in self.store.chunks}
        optimizer = ShardAdamW(
            groups,
            lr=lr,
            betas=betas,
            eps=eps,
            before_step=self._before_step,
            after_step=self._after_step,
            low_grads={
                c.shard_S: c.grad_S
                for c in self.store.chunks
                if c.shard_S is not None and c.grad_S is not None and c.shard_S.grad is None
            },
            later=self._overlapped_shards if self.overlap else None,
            worker=self.updates,
            reset_grad=self._reset_grad,
            new_moments=self._new_moments,
        )
        self.optimizer = optimizer
        return optimizer

    def _new_moments(self, shard_S: torch.Tensor) -> list[torch.Tensor]:
        """A host payload's moments are made in its home, a device payload's beside it: made
        elsewhere and copied in, they raised the peak host RAM by 8 bytes per parameter."""
        home = self.host_home.get(self._chunk_of_shard[shard_S].index)
        if home is not None and shard_S.data_ptr() == home[0].data_ptr():
            return [home[2].zero_(), home[3].zero_()]
        return [torch.zeros_like(shard_S), torch.zeros_like(shard_S)]

    def _reset_grad(self, shard_S: torch.Tensor) -> None:
        self.store.reset_grad(self._chunk_of_shard[shard_S])

    def _overlapped_shards(self) -> dict[torch.Tensor, int]:
        """Host-resident shards (after the warm-up) -> chunk id, in the forward's order of use."""
        manager = self.manager
        if manager.tracing:
            return {}
        chunks = self.store.chunks
        if not self._forward_order:  # first uses in the warm-up trace, then any never used
            self._forward_order = list(dict.fromkeys(manager.trace + list(range(len(chunks)))))
        host = [(chunks[c].shard_S, c) for c in self._forward_order if c not in manager.resident]
        return {shard_S: c for shard_S, c in host if shard_S is not None}

    def _before_step(self) -> None:
        for chunk in self.store.chunks:
            self.manager.touch(chunk.index)
        self.manager.settle()  # loads ahead must land before the step reads the payloads

    def _after_step(self) -> None:
        warming_up = self.manager.tracing
        self.manager.end_step()
        if warming_up and not self.manager.tracing:
            depth = self.store.order.depth = self._agree_gather_ahead()
            if self.static:
                self.manager.place_static(reserve=depth * self._gather_bytes())

    def _gather_bytes(self) -> int:
        """Device bytes of the largest gather in flight (staging and cast buffers included)."""
        store = self.store
        return max(store.full_bytes(c) + 2 * store.shard_bytes(c) for c in store.chunks)

    def _agree_gather_ahead(self) -> int:
        """``engine.gather_ahead``, lowered until that many more gathered chunks fit every
        traced position's room on every rank: the ranks must all start the same gathers
        ahead, or their collectives would pair up wrongly."""
        depth = self.cfg.gather_ahead
        spare = self.manager.spare_room()
        if depth and spare is not None:
            depth = min(depth, max(spare, 0) // self._gather_bytes())
        agreed = torch.tensor([depth], device=self.device)
        return int(self.comm.all_reduce(agreed, op=dist.ReduceOp.MIN).item())

    def move_payload(self, cid: int, to_device: bool) -> None:
        """Relocate chunk ``cid``'s shard, gradient and Adam moments to one tier.

        The host copy is the payload's home and is kept (pinned on CUDA) while a device copy
        serves: loading copies into fresh device memory, evicting copies back into the home,
        so no host memory is allocated (or pinned, which is slow) per eviction. The homes of the
        whole payload (moments included, even before the optimizer exists) are one exact-size
        allocation (``hostmem``), allocated once.
        """
        self.updates.wait(cid)
        self.store.grad_writer.wait(cid)
        chunk = self.store.chunks[cid]
        assert chunk.shard_S is not None and chunk.grad_S is not None
        tensors = [chunk.shard_S, chunk.grad_S]  # grad_S is shard_S.grad unless low-precision
        opt = getattr(self, "optimizer", None)
        state = opt.state[chunk.shard_S] if opt is not None else {}
        tensors += [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
        home = self.host_home.get(cid)
        if home is None:
            master = chunk.shard_S
            specs = [(t.shape, t.dtype) for t in (master, chunk.grad_S, master, master)]
            home = home_tensors(specs, pin=self.device.type == "cuda")
            self.host_home[cid] = home
        with torch.no_grad():
            for t, h in zip(tensors, home[: len(tensors)], strict=True):
                if to_device:
                    if t.data.data_ptr() != h.data_ptr():  # first load, or state replaced
                        h.copy_(t.data)
                    t.data = h.to(self.device, copy=True, non_blocking=h.is_pinned())
                else:
                    h.copy_(t.data)  # blocking: the CPU optimizer may read it next
                    t.data = h
        if "step" in state:
            step = state["step"]
            if to_device and self.device.type == "cuda" and not step.is_cuda:
                step = step.pin_memory()  # a pageable copy would wait for the queued upload
            state["step"] = step.to(self.device if to_device else "cpu", non_blocking=to_device)


def _ordered_params(model: nn.Module, order: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """Named parameters in order of first use (then any never used), tied ones once."""
    names = {p: n for n, p in model.named_parameters()}
    seen: dict[nn.Parameter, str] = {}
    for module in order:
        for p in module.parameters(recurse=False):
            if p in names and p not in seen:
                seen[p] = names[p]
    for p, n in names.items():
        seen.setdefault(p, n)
    return [(n, p) for p, n in seen.items() if p.requires_grad]


def apply(
    model: nn.Module,
    cfg: EngineConfig,
    *,
    comm: Comm,
    device: torch.device,
    run_forward: Callable[[], Any],
) -> Engine:
    """Partition ``model`` (already on ``device``, identical on every rank) in place.

    Args:
        run_forward: runs one small forward of ``model``; traced once for the order of first use.
    """
    engine = Engine(model, cfg, comm, device)
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            # The engine moves each gradient into its chunk at once; a cached per-layer gradient
            # buffer would be a third copy of every expert gradient.
            module.reuse_cpu_grad_buffers = False
    if cfg.expert_parallel:
        local_experts, engine.expert_groups = split_experts(model, comm, cfg.expert_parallel_size)
    else:
        local_experts = {}
    engine.expert_rows = local_experts
    order = trace_first_use(model, run_forward)
    named = _ordered_params(model, order)
    chunk_numel = max(int(cfg.chunk_mb * MB) // 4, 1)
    groups = engine.expert_groups  # expert chunks: ZeRO over the expert data-parallel group
    edp = groups.edp if groups is not None else comm
    chunks: list[Chunk] = []
    for params, group, decay in (
        ([x for x in named if x[1] not in local_experts and x[1].dim() >= 2], comm, True),
        ([x for x in named if x[1] not in local_experts and x[1].dim() < 2], comm, False),
        ([x for x in named if x[1] in local_experts], edp, True),
    ):
        chunks += pack(params, chunk_numel, group, decay, first=len(chunks))
    precision = Precision.named(cfg.param_dtype, cfg.reduce_dtype)
    store = ChunkStore(chunks, device, precision)
    store.materialize()  # fp32 master shards, gradient shards, views in param_dtype
    payload = [precision.payload_bytes(c.shard_numel) for c in chunks]  # master, grad, moments
    budget = int(cfg.device_budget_mb * MB)
    engine.manager = MemoryManager(
        device,
        budget,
        engine.move_payload,
        payload,
        probe=device_probe(device),
        prefetch_bytes=int(cfg.prefetch_mb * MB),
    )
    store.manager = engine.manager
    engine.manager.wait_update = engine.updates.wait
    engine.store = store
    engine.manager.place_initial()
    engine.hooks = Hooks(store, order)
    engine.hooks.install()
    return engine
