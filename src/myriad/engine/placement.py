"""Heterogeneous memory: which chunk shards live on the compute device, under a byte budget.

The manager accounts for every byte the engine keeps on the device: gathered full chunks
(parameters in use, their gradients during backward) and the device-resident *shard payloads*
(a chunk's owned parameter slice, gradient slice and Adam moments). Payloads not on the device
live in host memory (pinned when the device is CUDA) and their optimizer step runs on the CPU.

Placement follows the order of use traced in a warm-up step: every access to a payload is a
position in that trace, and when device memory is short the manager evicts the resident payload
whose next use is furthest in the future (Belady's rule). During the warm-up step (no trace yet)
it evicts the least recently used. On a CPU-only machine the "device" is also CPU memory, but the
accounting, placement and eviction are the same and the budget is enforced all the same.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from myriad.errors import UserError

MB = 1 << 20


class MemoryManager:
    """Byte accounting for the device tier plus the eviction policy for shard payloads.

    Args:
        device: the compute device (the "device" tier).
        budget_bytes: most managed bytes on the device at once; 0 means unlimited.
        move: ``move(chunk_id, to_device)`` relocates a payload's tensors (the engine does it).
        payload_bytes: bytes of each chunk's payload, by chunk id.
    """

    def __init__(
        self,
        device: torch.device,
        budget_bytes: int,
        move: Callable[[int, bool], None],
        payload_bytes: list[int],
    ) -> None:
        self.device = device
        self.budget = budget_bytes if budget_bytes > 0 else None
        self.move = move
        self.payload_bytes = payload_bytes
        self.resident: dict[int, int] = {}  # chunk id -> clock of its last use (on device)
        self.used = 0
        self.peak = 0
        self.evictions = 0
        self.loads = 0
        self.clock = 0
        self.trace: list[int] = []  # chunk ids in order of use over the warm-up step
        self.tracing = True
        self.uses: dict[int, list[int]] = {}  # chunk id -> its positions in the trace
        self.pos = 0  # position in the trace of the current step

    def place_initial(self) -> None:
        """Unlimited budget: every payload stays on the device, where the store made it.
        Otherwise all start on the host and move in as the warm-up step uses them."""
        for cid, nbytes in enumerate(self.payload_bytes):
            if self.budget is None:  # payloads are made on the device: nothing to move
                self._add(nbytes)
                self.resident[cid] = 0
            else:
                self.move(cid, False)

    # --- byte accounting -------------------------------------------------------------------
    def _add(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def alloc(self, nbytes: int, keep: int = -1) -> None:
        """Account ``nbytes`` of transient device memory (a gathered chunk), evicting payloads
        (never ``keep``) until it fits the budget."""
        while self.budget is not None and self.used + nbytes > self.budget:
            victim = self._victim(exclude=keep)
            if victim is None:
                raise UserError(
                    f"engine.device_budget_mb={self.budget / MB:g} is too small: the chunks in "
                    f"use need {(self.used + nbytes) / MB:.2f} MB; raise it or lower "
                    "engine.chunk_mb"
                )
            self._evict(victim)
        self._add(nbytes)

    def free(self, nbytes: int) -> None:
        self.used -= nbytes

    # --- payload placement -----------------------------------------------------------------
    def touch(self, cid: int) -> None:
        """Payload ``cid`` is about to be used: record it, and bring it to the device when that
        is worth it (it fits, or every victim it would need is used later than it)."""
        self.clock += 1
        if self.tracing:
            self.trace.append(cid)
        else:
            self.pos += 1
        if cid in self.resident:
            self.resident[cid] = self.clock
            return
        nbytes = self.payload_bytes[cid]
        if self.budget is None or nbytes > self.budget:
            return
        mine = self._next_use(cid)
        while self.used + nbytes > self.budget:
            victim = self._victim(exclude=cid)
            if victim is None or (not self.tracing and self._next_use(victim) <= mine):
                return  # cheaper to use it from the host this time
            self._evict(victim)
        self._add(nbytes)
        self.resident[cid] = self.clock
        self.loads += 1
        self.move(cid, True)

    def end_step(self) -> None:
        """After an optimizer step: the first one ends the warm-up trace."""
        if self.tracing and self.trace:
            self.tracing = False
            for i, cid in enumerate(self.trace):
                self.uses.setdefault(cid, []).append(i)
        self.pos = 0

    def _next_use(self, cid: int) -> int:
        """Trace positions from now to the next use of ``cid`` (wrapping into the next step)."""
        if self.tracing:
            return 0
        uses, n = self.uses.get(cid), len(self.trace)
        if not uses:
            return 2 * n + 1  # never used: the best victim
        i = bisect.bisect_left(uses, self.pos)
        return uses[i] - self.pos if i < len(uses) else uses[0] + n - self.pos

    def _victim(self, exclude: int) -> int | None:
        candidates = [c for c in self.resident if c != exclude]
        if not candidates:
            return None
        if self.tracing:  # least recently used
            return min(candidates, key=lambda c: self.resident[c])
        return max(candidates, key=self._next_use)

    def _evict(self, cid: int) -> None:
        del self.resident[cid]
        self.used -= self.payload_bytes[cid]
        self.evictions += 1
        self.move(cid, False)

    def report(self) -> dict[str, float]:
        return {
            "budget_bytes": self.budget or 0,
            "peak_device_bytes": self.peak,
            "budget_mb": (self.budget or 0) / MB,
            "peak_device_mb": self.peak / MB,
            "evictions": self.evictions,
            "loads": self.loads,
            "resident_chunks": len(self.resident),
        }
