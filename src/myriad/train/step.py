"""One optimizer step, read top to bottom: micro-batches → forward → backward → clip → step.

Shape legend: B batch, S sequence, E experts.

Everything that varies between runs (device, precision, clipping threshold, accumulation) is fixed
when :class:`TrainStep` is built; the step itself has no mode branches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from myriad.model import MoETransformerLM
from myriad.train.device import AutocastFactory

Batch = dict[str, torch.Tensor]


@dataclass
class StepMetrics:
    """What one optimizer step reports; losses are means over its micro-batches."""

    loss: float
    lm_loss: float
    load_balance_loss: float
    z_loss: float
    grad_norm: float  # global L2 norm before clipping
    lr: float  # the learning rate this step used
    tokens: int  # input tokens consumed by the step (all micro-batches)
    dropped_fraction: float
    tokens_per_expert: list[torch.Tensor]  # one (E,) int64 per MoE layer, summed over micro-batches


@dataclass
class Accumulated:
    """Loss sums (detached, on device) and expert loads of the micro-batches of one step."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped_fraction: torch.Tensor
    tokens_per_expert: list[torch.Tensor]
    tokens: int


def accumulate_gradients(
    model: MoETransformerLM,
    micro_batches: Sequence[Batch],
    autocast: AutocastFactory,
    device: torch.device,
) -> Accumulated:
    """Forward and backward each micro-batch, gradients scaled by ``1 / len(micro_batches)``.

    Each micro-batch loss is already a mean over its target tokens, so dividing by the number of
    micro-batches makes the accumulated gradient that of one big batch (exactly so when every
    micro-batch has the same number of targets; the Switch balance loss is per micro-batch).
    """
    n = len(micro_batches)
    zero = torch.zeros((), device=device)
    acc = Accumulated(zero, zero, zero, zero, zero, [], 0)
    for batch in micro_batches:
        input_ids_BS = batch["input_ids"].to(device, non_blocking=True)
        labels_BS = batch["labels"].to(device, non_blocking=True)
        with autocast():
            out = model(input_ids_BS, labels_BS)
        assert out.loss is not None and out.lm_loss is not None
        (out.loss / n).backward()
        acc.loss = acc.loss + out.loss.detach() / n
        acc.lm_loss = acc.lm_loss + out.lm_loss.detach() / n
        acc.load_balance_loss = acc.load_balance_loss + out.load_balance_loss.detach() / n
        acc.z_loss = acc.z_loss + out.z_loss.detach() / n
        if out.dropped_fraction is not None:
            acc.dropped_fraction = acc.dropped_fraction + out.dropped_fraction.detach() / n
        loads = [t.detach() for t in out.tokens_per_expert]
        acc.tokens_per_expert = (
            [a + b for a, b in zip(acc.tokens_per_expert, loads, strict=True)]
            if acc.tokens_per_expert
            else loads
        )
        acc.tokens += input_ids_BS.numel()
    return acc


class GradSync(Protocol):
    """Where gradients and step statistics meet across processes (an engine, or nothing)."""

    world: int

    def finish_backward(self) -> None: ...
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor: ...
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...


class LocalSync:
    """One process with ordinary parameters: nothing to reduce, torch's global-norm clip."""

    world = 1

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params

    def finish_backward(self) -> None:
        pass

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return nn.utils.clip_grad_norm_(self.params, max_norm)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t


class TrainStep:
    """Callable that turns ``grad_accum`` micro-batches into one optimizer step.

    ``grad_clip <= 0`` means "report the norm, do not clip": the threshold becomes infinity, which
    scales gradients by exactly 1, so there is one code path either way.
    """

    def __init__(
        self,
        model: MoETransformerLM,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler,
        *,
        grad_clip: float,
        autocast: AutocastFactory,
        device: torch.device,
        sync: GradSync | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        self.autocast = autocast
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sync: GradSync = sync if sync is not None else LocalSync(self.params)

    def __call__(self, micro_batches: Sequence[Batch]) -> StepMetrics:
        lr = self.optimizer.param_groups[0]["lr"]
        acc = accumulate_gradients(self.model, micro_batches, self.autocast, self.device)
        self.sync.finish_backward()
        grad_norm = self.sync.clip_grad_norm_(self.max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Across processes: losses are rank means, expert loads sums (as over micro-batches).
        terms = [acc.loss, acc.lm_loss, acc.load_balance_loss, acc.z_loss, acc.dropped_fraction]
        loss, lm_loss, lb, z, dropped = (
            self.sync.all_reduce_sum(torch.stack(terms)) / self.sync.world
        ).tolist()
        loads = acc.tokens_per_expert
        if loads:
            loads = list(self.sync.all_reduce_sum(torch.stack(loads)).unbind())
        self.model.update_router_biases(loads)
        return StepMetrics(
            loss=loss,
            lm_loss=lm_loss,
            load_balance_loss=lb,
            z_loss=z,
            grad_norm=grad_norm.item(),
            lr=lr,
            tokens=acc.tokens * self.sync.world,
            dropped_fraction=dropped,
            tokens_per_expert=[t.cpu() for t in loads],
        )
