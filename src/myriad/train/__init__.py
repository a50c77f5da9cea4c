"""Training: the step, the loop, checkpoints, metrics and plots.

Exports resolve lazily: ``myriad.config`` imports ``myriad.train.config`` while it is itself being
imported, and an eager import of ``pretrain`` here (which imports ``myriad.config``) would cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from myriad.train.checkpoint import load_model_from_checkpoint, read_checkpoint_info
    from myriad.train.pretrain import PretrainResult, load_run_config, run_pretrain

__all__ = [
    "PretrainResult",
    "load_model_from_checkpoint",
    "load_run_config",
    "read_checkpoint_info",
    "run_pretrain",
]

_HOMES = {
    "PretrainResult": "myriad.train.pretrain",
    "run_pretrain": "myriad.train.pretrain",
    "load_run_config": "myriad.train.pretrain",
    "read_checkpoint_info": "myriad.train.checkpoint",
    "load_model_from_checkpoint": "myriad.train.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'myriad.train' has no attribute {name!r}")
