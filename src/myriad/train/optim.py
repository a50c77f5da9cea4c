"""AdamW with decoupled weight decay and a linear-warm-up + cosine learning-rate schedule.

Weight decay applies to every parameter with two or more dimensions (projections, experts, the
router and the embedding matrix, which is also the tied LM head) and never to one-dimensional ones
(RMSNorm gains, biases). Decaying 1-D gains pulls them toward zero, which is a change of the
function's scale rather than a regulariser; decaying the embedding keeps rarely-seen token rows from
drifting, which matters with a tokenizer trained on a small corpus (nanoGPT makes the same split).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from myriad.train.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and 1-D parameters (not decayed).

    ``named_parameters`` yields a tied tensor once, so the shared embedding lands in one group.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where this build supports it on ``device`` (CUDA and CPU), else foreach.

    The fused kernel does the whole update in one pass over memory, the cheapest form on both
    devices; it is deterministic on CPU, which the bit-identical resume test relies on.
    """
    groups = parameter_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)  # type: ignore[arg-type]
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)  # type: ignore[arg-type]


def lr_multiplier(step: int, *, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Factor on the peak lr for optimizer step ``step`` (0-based).

    Linear warm-up reaches the peak at the last warm-up step, ``(step + 1) / warmup_steps``, so the
    very first update is small but not zero (a zero first step would waste a batch). Then a cosine
    from 1 to ``min_lr_ratio`` over the remaining ``steps - warmup_steps`` steps; past ``steps``
    (a run extended on resume) it stays at ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate used by optimizer step ``step`` (0-based)."""
    return cfg.lr * lr_multiplier(
        step, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """A ``LambdaLR`` whose ``last_epoch`` counts optimizer steps; its state dict resumes it."""
    fn: Callable[[int], float] = lambda step: lr_multiplier(  # noqa: E731
        step, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    return LambdaLR(optimizer, fn)
