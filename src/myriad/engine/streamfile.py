"""A safetensors file written one tensor at a time, so no process holds all of them at once.

The header (names, shapes, offsets) is computed from the shapes first; then each tensor's bytes
follow as the caller produces it (gathered from shards, say) and is dropped. fp32 only: what the
engine's master weights are. The file appears atomically (``shards._atomic`` semantics:
temporary file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
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
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
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
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return out
