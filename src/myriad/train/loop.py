"""The training loop: steps, held-out evaluation and checkpoints at their cadences.

Every object is built beforehand (see ``pretrain.py``); this file only sequences them. The order
within a step is fixed so a resumed run repeats it exactly: step → train row → (eval → held-out
row) → (checkpoint). A checkpoint at step k therefore already holds step k's held-out loss.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from myriad.model import IGNORE_INDEX, MoETransformerLM
from myriad.train import checkpoint
from myriad.train.config import TrainConfig
from myriad.train.device import AutocastFactory
from myriad.train.metrics import MetricsLogger, heldout_row, train_row
from myriad.train.routing_stats import RoutingMonitor
from myriad.train.state import Progress, summary, trainer_state
from myriad.train.step import Batch, TrainStep

Clock = Callable[[], float]  # seconds of training so far, across resumes


class BatchStream(Protocol):
    """The data pipeline's endless, resumable stream of training batches."""

    @property
    def tokens_per_batch(self) -> int: ...

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def follow(self, state: dict[str, Any]) -> None:
        """Move to the position of ``state``, saved by another rank's stream (same data, its
        own seed): a rank added on resume continues where the others are."""


@dataclass
class Loop:
    """The objects one run is made of, built once by ``pretrain.build_loop``."""

    train_cfg: TrainConfig
    config_dict: dict[str, Any]  # the whole RunConfig, written into every checkpoint
    checkpoint_root: Path
    model: MoETransformerLM
    step_fn: TrainStep
    stream: BatchStream
    heldout: list[Batch]
    autocast: AutocastFactory
    device: torch.device
    routing: RoutingMonitor = field(default_factory=RoutingMonitor)  # balance and churn


@torch.no_grad()
def heldout_loss(
    model: MoETransformerLM, batches: list[Batch], autocast: AutocastFactory, device: torch.device
) -> float | None:
    """LM loss (without the balancing terms) over the fixed held-out batches, per target token.

    Batches are weighted by their number of targets, so a short last batch counts for what it holds.
    """
    if not batches:
        return None
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for batch in batches:
        labels_BS = batch["labels"].to(device)
        with autocast():
            out = model(batch["input_ids"].to(device), labels_BS)
        assert out.lm_loss is not None
        targets_BS = labels_BS[:, 1:] if model.cfg.objective == "clm" else labels_BS
        n = int((targets_BS != IGNORE_INDEX).sum())
        total += out.lm_loss.double() * n
        count += n
    model.train()
    return (total / max(count, 1)).item()


def _evaluate(loop: Loop, progress: Progress, metrics: MetricsLogger, clock: Clock) -> None:
    """Held-out loss now; the row's ``elapsed`` includes the evaluation itself."""
    loss = heldout_loss(loop.model, loop.heldout, loop.autocast, loop.device)
    if loss is None:
        return
    progress.last["heldout_loss"] = loss
    progress.last.setdefault("first_heldout_loss", loss)
    routing = loop.routing.measure(loop.model, loop.heldout, loop.autocast, loop.device)
    row = heldout_row(loss, step=progress.step, tokens_seen=progress.tokens_seen, elapsed=clock())
    metrics.heldout(row | routing)


def save(loop: Loop, progress: Progress, keep: int) -> Path:
    """Checkpoint the end of step ``progress.step`` (weights, config, optimizer, RNG, data).

    Under the ``myriad`` and ``fsdp2`` engines every rank writes its own shards and trainer
    state into one step directory (``shard_checkpoint``, a collective); otherwise one
    consolidated checkpoint.
    """
    from myriad.engine.runtime import checkpoint_parts
    from myriad.train.shard_checkpoint import save_sharded_checkpoint

    optimizer, scheduler = loop.step_fn.optimizer, loop.step_fn.scheduler
    parts = checkpoint_parts(loop.step_fn.sync, loop.model, optimizer)
    stream_state = loop.stream.state_dict()
    state = trainer_state(progress, optimizer, scheduler, stream_state, moments=parts is None)
    state["routing_monitor"] = loop.routing.state_dict()
    human = summary(progress, optimizer.param_groups[0]["lr"], loop.step_fn.sync.world)
    if parts is not None:
        return save_sharded_checkpoint(
            loop.checkpoint_root,
            step=progress.step,
            parts=parts,
            config=loop.config_dict,
            state=state,
            summary=human,
            keep=keep,
        )
    return checkpoint.save_checkpoint(
        loop.checkpoint_root,
        step=progress.step,
        model=loop.model,
        config=loop.config_dict,
        state=state,
        summary=human,
        keep=keep,
    )


def _add_load(progress: Progress, loads: list[torch.Tensor]) -> None:
    if not loads:
        return
    load_LE = torch.stack(loads).to(torch.int64)
    if progress.expert_load_LE is None:
        progress.expert_load_LE = load_LE
    else:
        progress.expert_load_LE = progress.expert_load_LE + load_LE


def run_loop(loop: Loop, progress: Progress, metrics: MetricsLogger) -> Progress:
    """Train from ``progress.step`` to ``train_cfg.steps``; evaluates at step 0 of a fresh run."""
    cfg = loop.train_cfg
    start, base_elapsed = time.perf_counter(), progress.elapsed

    def clock() -> float:
        return base_elapsed + time.perf_counter() - start

    if progress.step == 0:
        _evaluate(loop, progress, metrics, clock)
    while progress.step < cfg.steps:
        t0 = time.perf_counter()
        micro_batches = [loop.stream.next_batch() for _ in range(cfg.grad_accum)]
        m = loop.step_fn(micro_batches)
        step_s = time.perf_counter() - t0

        progress.step += 1
        progress.tokens_seen += m.tokens
        progress.elapsed = clock()
        progress.last.update(loss=m.loss, lm_loss=m.lm_loss)
        if progress.step == cfg.freeze_routing_step:  # word-vector routing: fixed from here on
            loop.model.freeze_routing()
        _add_load(progress, m.tokens_per_expert)
        metrics.train(
            train_row(
                m,
                step=progress.step,
                tokens_seen=progress.tokens_seen,
                step_s=step_s,
                elapsed=progress.elapsed,
            )
        )
        is_last = progress.step == cfg.steps
        if is_last or (cfg.eval_every > 0 and progress.step % cfg.eval_every == 0):
            _evaluate(loop, progress, metrics, clock)
        if is_last or (cfg.checkpoint_every > 0 and progress.step % cfg.checkpoint_every == 0):
            progress.elapsed = clock()
            save(loop, progress, cfg.keep_checkpoints)
    return progress
