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

import math
import mmap
import weakref

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
            return torch.empty(total, dtype=torch.uint8, pin_memory=True)
        weakref.finalize(arena, cudart.cudaHostUnregister, ptr)
    return arena


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
