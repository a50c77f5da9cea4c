"""What an exact resume needs besides the weights: optimizer, schedule, RNGs, data position.

Everything here is saved with ``torch.save`` and loaded with ``weights_only=True``, so it holds only
tensors and plain Python values (the NumPy RNG state is converted to a tensor for that reason).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from myriad.errors import UserError


@dataclass
class Progress:
    """Counters that survive a resume; ``expert_load_LE`` sums routed tokens over the whole run."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds of training (not counting time between a stop and a resume)
    expert_load_LE: torch.Tensor | None = None
    last: dict[str, Any] = field(default_factory=dict)  # last train/heldout losses, for humans


def capture_rng() -> dict[str, Any]:
    """Torch (CPU and every CUDA device), Python and NumPy generator states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, cached],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))


def seed_everything(seed: int) -> None:
    """Same seed for every generator the run may touch, so a run is reproducible from its config."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def trainer_state(
    progress: Progress,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    stream_state: dict[str, Any],
    *,
    moments: bool = True,
) -> dict[str, Any]:
    """The ``trainer_state.pt`` payload at the end of step ``progress.step``.

    ``moments=False`` keeps only the optimizer's hyper-parameters (lr, betas, ...): the engine's
    sharded checkpoints hold the moments in the shard files instead.
    """
    opt = optimizer.state_dict()
    if not moments:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        opt = {"param_groups": groups}
    return {
        "step": progress.step,
        "tokens_seen": progress.tokens_seen,
        "elapsed": progress.elapsed,
        "expert_load_LE": progress.expert_load_LE,
        "last": progress.last,
        "optimizer": opt,
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng(),
        "data_stream": stream_state,
    }


def restore_trainer_state(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Progress:
    """Load optimizer and schedule; return the counters. RNGs are restored by the caller last.

    Without ``state`` (a sharded checkpoint) only the groups' hyper-parameters are set; the
    moments come from the shard files.
    """
    saved = state["optimizer"]
    if "state" in saved:
        optimizer.load_state_dict(saved)
    else:
        if len(saved["param_groups"]) != len(optimizer.param_groups):
            raise UserError(
                f"trainer state has {len(saved['param_groups'])} optimizer groups, the run "
                f"{len(optimizer.param_groups)}"
            )
        for group, values in zip(optimizer.param_groups, saved["param_groups"], strict=True):
            group.update(values)
    scheduler.load_state_dict(state["scheduler"])
    # The groups' lr came back as saved; recompute it from this run's schedule at the saved step,
    # so a run whose ``train.steps`` was raised follows the new cosine from its first step.
    scheduler.last_epoch -= 1
    scheduler.step()
    return Progress(
        step=int(state["step"]),
        tokens_seen=int(state["tokens_seen"]),
        elapsed=float(state["elapsed"]),
        expert_load_LE=state["expert_load_LE"],
        last=dict(state["last"]),
    )


def summary(progress: Progress, lr: float, processes: int) -> dict[str, Any]:
    """The human-readable ``trainer_state.json`` (``processes``: the run's world size)."""
    import datetime

    return {
        "step": progress.step,
        "tokens_seen": progress.tokens_seen,
        "elapsed_s": round(progress.elapsed, 3),
        "lr": lr,
        "processes": processes,
        **progress.last,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
