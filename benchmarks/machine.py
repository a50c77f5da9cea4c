"""The machine a benchmark ran on, as its reports name it."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_name() -> str:
    """CPU model and core count, or the GPU's name when CUDA is there."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.machine()
