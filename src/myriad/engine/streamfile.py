"""A safetensors file written one tensor at a time, so no process holds all of them at once.

The header (names, shapes, offsets) is computed from the shapes first; then each tensor's bytes
follow as the caller produces it (gathered from shards, say) and is dropped. fp32 only: what the
engine's master weights are. The file appears atomically (:func:`write_atomic`: temporary file,
fsync, rename, fsync of the directory), which the engine's shard files use too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from myriad.errors import UserError


def write_streamed(
    out: Path, shapes: dict[str, list[int]], tensors: Iterable[torch.Tensor]
) -> Path:
    """Write ``tensors`` (fp32, in the order and shapes of ``shapes``) as the file ``out``."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for (name, shape), tensor in zip(shapes.items(), tensors, strict=True):
                if tensor.dtype != torch.float32 or list(tensor.shape) != shape:
                    raise UserError(
                        f"{out}: {name} is {tensor.dtype} {list(tensor.shape)}, "
                        f"expected fp32 {shape}"
                    )
                f.write(tensor.detach().cpu().contiguous().numpy().tobytes())

    write_atomic(out, write)
    return out


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` into a temporary file beside ``path``, fsync it, rename it into place and fsync
    the directory: a crash leaves the previous file (or none), never half of one."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
