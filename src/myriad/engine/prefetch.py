"""The device-side mechanics of placement: payload loads on a side stream, and the memory probe.

``SideStream`` runs the loads the memory manager decides to make *ahead* of use. On CUDA each
load is issued on a dedicated stream, so the host→device copy overlaps the compute queued on the
current stream, and an event is recorded after it; every consumer makes the current stream wait
on that event (``ready``) before touching the payload, and ``settle`` does so for all of them at
the points where the step reads every payload (before the gradient clip and the optimizer).

Why the memory is safe without ``record_stream``: the copy's source is the payload's pinned host
home, which the engine keeps for the payload's lifetime; its destination is allocated on the side
stream and freed only by an eviction, which first waits on the event and then copies back with a
blocking device→host copy on the current stream, so every kernel that read the device copy has
finished before its memory can be handed out again. The side stream does not wait for the
current stream before copying (that would serialise the copy after the queued compute): nothing
queued there writes the host home, which only the host changes, synchronously.

On a CPU-only machine there are no streams: ``load`` is the synchronous move and the bookkeeping
(pending loads, ``ready``, ``settle``) runs unchanged, so the CPU tests exercise it.

``device_probe`` reads the device allocator for the manager's warm-up trace of non-model memory.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

Probe = Callable[[], tuple[int, int]]  # () -> (bytes allocated now, peak since the last call)


class SideStream:
    """Loads payloads ahead of use; on CUDA on a dedicated stream, consumers wait on an event."""

    def __init__(self, device: torch.device, move: Callable[[int, bool], Any]) -> None:
        self.device = device
        self.move = move
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: dict[int, Any] = {}  # chunk id -> its load's CUDA event (None on CPU)

    def load(self, cid: int) -> None:
        """Start moving payload ``cid`` to the device; its tensors point at the device copy at
        once, and ``ready(cid)`` orders the current stream after the copy."""
        side = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with side:  # allocations and the copy are queued on the side stream
            self.move(cid, True)
        event = None
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[cid] = event

    def ready(self, cid: int) -> None:
        """Payload ``cid`` is about to be read or written: wait for its load, if one is pending."""
        if cid not in self.pending:
            return
        event = self.pending.pop(cid)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def settle(self) -> None:
        """Wait for every pending load (the step is about to read all payloads)."""
        for cid in list(self.pending):
            self.ready(cid)


def device_probe(device: torch.device) -> Probe | None:
    """The allocator probe for ``device``: CUDA's allocated bytes and their peak since the last
    call (the peak statistic is reset at each call, so only the warm-up step calls it).

    On a CPU there is no device allocator to read: the "device" tier is the host's own memory,
    and the process's resident size cannot tell activations from the payload homes or from the
    pages the C allocator keeps after a free, so a reading would shrink the room by noise. The
    CPU gets no probe: its budget covers the managed bytes, as before.
    """
    if device.type != "cuda":
        return None

    def probe() -> tuple[int, int]:
        now = torch.cuda.memory_allocated(device)
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return now, peak

    return probe
