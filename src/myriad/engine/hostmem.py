"""Host homes of payloads: one exact-size allocation per chunk, page-locked in place on CUDA.

Why not ``torch.empty(..., pin_memory=True)`` per tensor: PyTorch's caching pinned allocator
rounds every block up to a power of two and keeps freed blocks for good, so homes of arbitrary
sizes cost up to twice their bytes of host RAM, which the issue's 14 bytes per parameter cannot
afford. Here a chunk's homes (fp32 master, gradient shard, two fp32 moments) are carved, 64-byte
aligned, from one anonymous mapping of whole pages (returned to the system when freed, never
kept by the C allocator); on a CUDA machine it is page-locked in place with ``cudaHostRegister``
(as ``torch.cuda`` does for shared memory) and unregistered when the last home is gone. Each
mapping has pages of its own, so no two registrations overlap, and the tensors' storage starts
at the registered address, so ``is_pinned()`` holds and copies from it run asynchronously. If
registration fails, the caching pinned allocator is used instead.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import weakref
from pathlib import Path

import torch

ALIGN = 64  # bytes: each home starts on a cache line
PAGE = mmap.PAGESIZE
SMALL = 1 << 20  # bytes: smaller homes come from the ordinary (pinned) allocators


def home_tensors(specs: list[tuple[torch.Size, torch.dtype]], pin: bool) -> list[torch.Tensor]:
    """Empty host tensors of the given shapes and dtypes, sharing one allocation."""
    sizes = [math.prod(shape) * _itemsize(dtype) for shape, dtype in specs]
    offsets, total = [], 0
    for nbytes in sizes:
        offsets.append(total)
        total += -(-nbytes // ALIGN) * ALIGN
    arena = _arena(total, pin)
    homes = []
    for (shape, dtype), offset, nbytes in zip(specs, offsets, sizes, strict=True):
        home = arena[offset : offset + nbytes].view(dtype).view(shape)
        home._home_arena = arena  # type: ignore[attr-defined]  # keeps it (and its pin) alive
        homes.append(home)
    return homes


def _arena(total: int, pin: bool) -> torch.Tensor:
    """``total`` bytes in whole pages of their own (an anonymous mapping: returned to the system
    when freed, and page-locked without touching a neighbour's pages)."""
    if total < SMALL:  # a few pages: not worth a mapping of its own (their number is limited)
        return torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    length = -(-total // PAGE) * PAGE
    arena = torch.frombuffer(mmap.mmap(-1, length), dtype=torch.uint8)
    if pin:
        ptr = arena.data_ptr()
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(ptr, length, 1)) != 0:  # 1: cudaHostRegisterPortable
            _clear_cuda_error()
            return torch.empty(total, dtype=torch.uint8, pin_memory=True)
        weakref.finalize(arena, cudart.cudaHostUnregister, ptr)
    return arena


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a failed call whose error was handled here.

    A failed ``cudaHostRegister`` stays the runtime's last error, and PyTorch's next kernel
    launch check (``cudaGetLastError``) would raise it as that kernel's failure. PyTorch's
    bindings have no ``cudaGetLastError``, so it is called in the runtime library that PyTorch
    loaded (its wheels load ``libcudart`` dynamically; found in this process's mappings).
    """
    lib = _loaded_cudart()
    if lib is not None:
        lib.cudaGetLastError()


@functools.cache
def _loaded_cudart() -> ctypes.CDLL | None:
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and "/libcudart.so" in fields[5]:
            return ctypes.CDLL(fields[5])  # already loaded: the same runtime, not a second one
    return None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
