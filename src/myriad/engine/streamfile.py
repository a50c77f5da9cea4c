"""A safetensors file written one tensor at a time, so no process holds all of them at once.

The header (names, shapes, offsets) is computed from the shapes first; then each tensor's bytes
follow as the caller produces it (gathered from shards, say) and is dropped. fp32 (the engine's
master weights) unless the caller names another dtype (buffers: int64 ids, bool flags). The file
appears atomically (:func:`write_atomic`: temporary file,
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

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_streamed(
    out: Path,
    shapes: dict[str, list[int]],
    tensors: Iterable[torch.Tensor],
    dtypes: dict[str, torch.dtype] | None = None,
) -> Path:
    """Write ``tensors`` (in the order and shapes of ``shapes``; fp32 unless ``dtypes`` names
    another) as the file ``out``."""
    want = {name: (dtypes or {}).get(name, torch.float32) for name in shapes}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * want[name].itemsize
        header[name] = {
            "dtype": _DTYPES[want[name]],
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for (name, shape), tensor in zip(shapes.items(), tensors, strict=True):
                if tensor.dtype != want[name] or list(tensor.shape) != shape:
                    raise UserError(
                        f"{out}: {name} is {tensor.dtype} {list(tensor.shape)}, "
                        f"expected {want[name]} {shape}"
                    )
                raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                f.write(raw.numpy().tobytes())

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
