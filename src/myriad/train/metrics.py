"""Per-step metrics: JSON lines on disk, TensorBoard event files, and a progress bar.

Shape legend: L MoE layers, E experts.

``metrics.jsonl`` is the record a user (or ``plots.py``) reads; TensorBoard is a convenience and is
skipped silently when the ``tensorboard`` package is missing. Rows are flushed every write so a
crashed run keeps its curve up to the crash.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from myriad.train.step import StepMetrics


def load_imbalance(tokens_per_expert: list[torch.Tensor]) -> tuple[float | None, list[float]]:
    """Max over mean tokens per expert, per MoE layer, and the worst layer (1.0 is perfect)."""
    per_layer = []
    for load_E in tokens_per_expert:
        load_E = load_E.float()
        mean = load_E.mean().item()
        per_layer.append(load_E.max().item() / mean if mean > 0 else 1.0)
    return (max(per_layer) if per_layer else None), per_layer


def train_row(m: StepMetrics, *, step: int, tokens_seen: int, step_s: float, elapsed: float):
    """The JSON row for one optimizer step; ``tokens`` is the cumulative count."""
    overall, per_layer = load_imbalance(m.tokens_per_expert)
    return {
        "kind": "train",
        "step": step,
        "loss": m.loss,
        "lm_loss": m.lm_loss,
        "load_balance_loss": m.load_balance_loss,
        "z_loss": m.z_loss,
        "lr": m.lr,
        "grad_norm": m.grad_norm,
        "tokens": tokens_seen,
        "tokens_per_s": m.tokens / step_s if step_s > 0 else 0.0,
        "elapsed": elapsed,
        "expert_load_max_over_mean": overall,
        "expert_load_max_over_mean_per_layer": per_layer,
        "dropped_fraction": m.dropped_fraction,
    }


def heldout_row(loss: float, *, step: int, tokens_seen: int, elapsed: float) -> dict[str, Any]:
    return {
        "kind": "heldout",
        "step": step,
        "heldout_loss": loss,
        "tokens": tokens_seen,
        "elapsed": elapsed,
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl``; a torn last line (crash mid-write) is skipped."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows after ``last_step``: a resumed run rewrites the steps it repeats."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def _summary_writer(log_dir: Path, purge_step: int | None):
    """A TensorBoard writer, or None when ``tensorboard`` is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class MetricsLogger:
    """Appends rows to ``metrics.jsonl``, mirrors scalars to TensorBoard, drives the progress bar.

    Args:
        out_dir: the run directory; writes ``metrics.jsonl`` and ``tensorboard/`` there.
        total_steps: for the bar's ETA.
        start_step: the step a resumed run starts after; TensorBoard events past it are purged.
        log: where milestone lines go when no interactive bar is shown (not a terminal).
    """

    def __init__(self, out_dir: Path, *, total_steps: int, start_step: int, log: Callable) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.file = self.path.open("a", encoding="utf-8")
        self.tb = _summary_writer(out_dir / "tensorboard", start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", disable=None)
        self.log = log
        self.total_steps = total_steps
        self.last_loss = math.nan
        self.last_heldout = math.nan

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self.tb.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def train(self, row: dict[str, Any]) -> None:
        self.write(row)
        self.last_loss = row["loss"]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", heldout=f"{self.last_heldout:.4f}")

    def heldout(self, row: dict[str, Any]) -> None:
        self.write(row)
        self.last_heldout = row["heldout_loss"]
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", heldout=f"{self.last_heldout:.4f}")
        if self.bar.disable:
            train = "-" if math.isnan(self.last_loss) else f"{self.last_loss:.4f}"
            self.log(
                f"step {row['step']}/{self.total_steps}  train loss {train}  "
                f"held-out loss {self.last_heldout:.4f}"
            )

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
