"""Device and precision choice, made once when the run's objects are built.

The step never asks which precision it runs in: it receives a context-manager factory here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from myriad.errors import UserError

AutocastFactory = Callable[[], AbstractContextManager]


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """``auto`` is CUDA when present, else CPU; an unavailable explicit device is a user error
    naming ``setting`` (the recipe key, or the command's flag)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{setting}: unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{setting} is {name!r} but no CUDA device is available; use auto or cpu")
    return device


def autocast_factory(precision: str, device: torch.device) -> AutocastFactory:
    """bf16 autocast for ``bf16``, and for ``auto`` on a GPU; plain fp32 otherwise.

    On CPU ``auto`` stays fp32: CPU bf16 matmuls are slower than fp32 on most laptops, and fp32
    keeps the CPU run bit-reproducible across resume.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def precision_name(precision: str, device: torch.device) -> str:
    """What ``autocast_factory`` chose, in words for the start-up log line."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return "bf16 autocast" if bf16 else "fp32"
