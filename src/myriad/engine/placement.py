"""Heterogeneous memory: which chunk shards live on the compute device, under a byte budget.

The manager accounts for every byte the engine keeps on the device: gathered full chunks
(parameters in use, their gradients during backward, staging buffers: the *transient* bytes) and
the device-resident *shard payloads* (a chunk's owned parameter slice, gradient slice and Adam
moments). Payloads not on the device live in host memory (pinned when the device is CUDA) and
their optimizer step runs on the CPU.

The first optimizer step is the warm-up. Every payload access is recorded as a position in the
trace, and a device *probe* (``prefetch.device_probe``) is read before every change of the managed
bytes: what the allocator holds beyond them is *non-model* memory (activations, temporaries),
and its peak in the interval after each access is kept per position, as PatrickStar does. After
the warm-up the room for managed bytes at position p is the budget minus the traced non-model
peak of the intervals next to p (p-1, p, p+1) plus a margin, so ``engine.device_budget_mb``
bounds everything the step keeps on the device. Without a probe (a CPU) non-model memory is zero.

*Static* placement (``engine.placement``, the default on CUDA) fixes the resident payloads at
the end of the warm-up: the first ones in order of use that fit the least room any position
leaves (beyond its traced transient bytes and the gathers started ahead); the rest stay on the
host for good. Their gathers then upload only their parameters (2 bytes each in bf16) and their
gradients come down once, instead of whole payloads (14-16 bytes per parameter) moving in and
out. On the first H200 run the dynamic policy evicted 113 payloads of 0.9 GB in 4 steps of a
2.7 B model: ~50 GB a step over a PCIe link that moves ~55 GB/s each way.

*Dynamic* placement (the default elsewhere) follows the trace: the resident payload whose next
use is furthest in the future goes first (Belady's rule; least recently used during the
warm-up). After each access the payloads used at the next positions (up to ``prefetch_bytes``
of them) are loaded ahead on a side stream, each only if it fits the least room (minus the
traced transient bytes) up to its use, by evicting only payloads needed later than it.

On a CPU-only machine the "device" is CPU memory too, but the accounting, placement, eviction
and prefetch decisions are the same and the budget is enforced.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

import torch

from myriad.engine.prefetch import Probe, SideStream
from myriad.errors import UserError

MB = 1 << 20
MARGIN = 0.1  # room kept free beyond the traced non-model peak, as a fraction of that peak
# ... and at least this much with a probe: the allocator rounds every block up to 512 bytes
# (the 4-byte Adam step takes 512), which the managed counts do not see.
MARGIN_FLOOR = 1 << 20


class MemoryManager:
    """Byte accounting for the device tier plus the placement policy for shard payloads.

    Args:
        device: the compute device (the "device" tier).
        budget_bytes: most device bytes for the step (managed plus traced non-model); 0 means
            unlimited.
        move: ``move(chunk_id, to_device)`` relocates a payload's tensors (the engine does it).
        payload_bytes: bytes of each chunk's payload, by chunk id.
        probe: reads the device allocator (``prefetch.Probe``) in the warm-up, when there is a
            budget; None means no non-model memory.
        prefetch_bytes: payload bytes looked ahead after the warm-up; 0 loads on demand only.
        margin: room kept beyond the traced non-model peak, as a fraction of it ...
        margin_floor: ... and at least these bytes when there is a probe.
    """

    def __init__(
        self,
        device: torch.device,
        budget_bytes: int,
        move: Callable[[int, bool], Any],
        payload_bytes: list[int],
        *,
        probe: Probe | None = None,
        prefetch_bytes: int = 0,
        margin: float = MARGIN,
        margin_floor: int = MARGIN_FLOOR,
    ) -> None:
        self.device = device
        self.budget = budget_bytes if budget_bytes > 0 else None
        self.move = move
        self.payload_bytes = payload_bytes
        self.probe = probe if self.budget is not None else None  # no budget: nothing to fit
        self.prefetch_bytes, self.margin = prefetch_bytes, margin
        self.static = False  # set by ``place_static``: no loads after the warm-up
        self.margin_floor = margin_floor if self.probe is not None else 0
        self.transfers = SideStream(device, move)
        self.resident: dict[int, int] = {}  # chunk id -> clock of its last use (on device)
        self.payload_used = 0  # bytes of resident payloads
        self.transient = 0  # bytes of gathered chunks, gradient buffers, staging
        self.peak = 0
        self.clock = 0
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.prefetched: set[int] = set()  # loaded ahead, not used yet
        self.trace: list[int] = []  # chunk ids in order of use over the warm-up step
        self.tracing = True
        self.uses: dict[int, list[int]] = {}  # chunk id -> its positions in the trace
        self.pos = 0  # accesses so far in the current step (after the warm-up)
        self.nonmodel: list[int] = []  # per position: peak non-model bytes after that access
        self.transient_peak: list[int] = []  # per position: peak transient bytes after it
        self.head_nonmodel = 0  # non-model peak before the warm-up's first access
        self.seen_nonmodel = 0  # the warm-up's highest non-model reading so far
        self.warmup_device_peak = 0  # the probe's highest reading (all device memory)
        self.room: list[int] = []  # per position, after the warm-up: most managed bytes
        # waits for a payload's overlapped optimizer update before it is read (``overlap.py``)
        self.wait_update: Callable[[int], None] = lambda cid: None

    @property
    def used(self) -> int:
        return self.payload_used + self.transient

    def place_initial(self) -> None:
        """Unlimited budget: every payload stays on the device, where the store made it.
        Otherwise all start on the host and move in as the warm-up step uses them."""
        for cid, nbytes in enumerate(self.payload_bytes):
            if self.budget is None:  # payloads are made on the device: nothing to move
                self.payload_used += nbytes
                self.resident[cid] = 0
            else:
                self.move(cid, False)
        self.peak = max(self.peak, self.used)
        if self.probe is not None:
            self.probe()  # start the probe's window: what came before is not the step's

    # --- the warm-up's measurements --------------------------------------------------------
    def _sample(self) -> None:
        """Before the managed bytes change: what the device held beyond them since the last
        sample is non-model memory of the current trace position."""
        if not self.tracing or self.probe is None:
            return
        now, peak = self.probe()
        self.warmup_device_peak = max(self.warmup_device_peak, now, peak)
        nonmodel = max(now, peak, 0) - self.used
        self.seen_nonmodel = max(self.seen_nonmodel, nonmodel)
        if self.trace:
            self.nonmodel[-1] = max(self.nonmodel[-1], nonmodel)
        else:
            self.head_nonmodel = max(self.head_nonmodel, nonmodel)

    def _finish_trace(self) -> None:
        """End of the warm-up: index the uses and fix the room at every position."""
        self._sample()  # the last interval includes the optimizer step
        self.tracing = False
        for i, cid in enumerate(self.trace):
            self.uses.setdefault(cid, []).append(i)
        n = len(self.trace)
        self.nonmodel[-1] = max(self.nonmodel[-1], self.head_nonmodel)  # wraps into the next
        if self.budget is not None:
            for p in range(n):
                near = max(self.nonmodel[(p + d) % n] for d in (-1, 0, 1))
                self.room.append(self.budget - self._reserve(near))

    def _limit(self) -> int | None:
        """Most managed bytes allowed now."""
        if self.budget is None:
            return None
        if self.tracing:
            return self.budget - self._reserve(self.seen_nonmodel)
        return self.room[self._cur()]

    def _reserve(self, nonmodel: int) -> int:
        """Device bytes kept for ``nonmodel`` bytes of other memory, margin included."""
        return nonmodel + max(math.ceil(nonmodel * self.margin), self.margin_floor)

    def _cur(self) -> int:
        """The trace position of the latest access (the interval the step is in)."""
        return (self.pos - 1) % len(self.trace)

    def spare_room(self) -> int | None:
        """After the warm-up: the least room any position leaves beyond its traced transient
        bytes with every payload on the host (None: no budget)."""
        if self.budget is None:
            return None
        return min(r - t for r, t in zip(self.room, self.transient_peak, strict=True))

    # --- byte accounting -------------------------------------------------------------------
    def alloc(self, nbytes: int, keep: int = -1) -> None:
        """Account ``nbytes`` of transient device memory (a gathered chunk), evicting payloads
        (never ``keep``) until it fits."""
        limit = self._limit()
        if limit is not None:
            victims = self._plan(nbytes, limit, keep, -1)
            if victims is None and keep in self.resident:
                # Last resort: the payload in use goes home too; the gather stages its shard
                # from there and the reduce adds into it there.
                victims = self._plan(nbytes, limit, -1, -1)
                self.counts["in_use_evictions"] += victims is not None and keep in victims
            if victims is None:
                nonmodel = self.budget - limit if self.budget is not None else 0
                raise UserError(
                    f"engine.device_budget_mb={(self.budget or 0) / MB:g} is too small: the "
                    f"chunks in use need {(self.transient + nbytes) / MB:.2f} MB and the step's "
                    f"other device memory (traced, with margin) {nonmodel / MB:.2f} MB; raise "
                    "it or lower engine.chunk_mb"
                )
            for victim in victims:
                self._evict(victim)
        self._sample()
        self.transient += nbytes
        self.peak = max(self.peak, self.used)
        if self.trace:
            cur = len(self.trace) - 1 if self.tracing else self._cur()
            self.transient_peak[cur] = max(self.transient_peak[cur], self.transient)

    def free(self, nbytes: int) -> None:
        """Transient device memory was freed (after the tensor's storage is gone)."""
        self._sample()
        self.transient -= nbytes

    # --- payload placement -----------------------------------------------------------------
    def touch(self, cid: int) -> None:
        """Payload ``cid`` is about to be used: record it, bring it to the device when that is
        worth it, then load the next payloads ahead."""
        self.wait_update(cid)
        self.clock += 1
        if self.tracing:
            self._sample()  # closes the previous position's interval
            self.trace.append(cid)
            self.nonmodel.append(0)
            self.transient_peak.append(self.transient)
        else:
            self.pos += 1
            self._shrink(keep=cid)
        self.transfers.ready(cid)
        if cid in self.resident:
            self.resident[cid] = self.clock
            if cid in self.prefetched:
                self.prefetched.discard(cid)
                self.counts["prefetch_hits"] += 1
        elif self.static:
            self.counts["host_accesses"] += 1
        else:
            self._load_on_demand(cid)
        if self.static or self.tracing or self.budget is None or self.prefetch_bytes == 0:
            return
        self._prefetch(cid)

    def ready(self, cid: int) -> None:
        """Payload ``cid``'s tensors are about to be read outside ``touch`` (a gather)."""
        self.wait_update(cid)
        self.transfers.ready(cid)

    def settle(self) -> None:
        """Every payload is about to be read (gradient clip, optimizer): wait for all loads."""
        self.transfers.settle()

    def end_step(self) -> None:
        """After an optimizer step: the first one ends the warm-up trace."""
        if self.tracing and self.trace:
            self._finish_trace()
        self.pos = 0

    def place_static(self, reserve: int) -> None:
        """After the warm-up: keep on the device for good the first payloads in order of use
        whose bytes fit the least room of any position less ``reserve``; send the others home.
        A payload evicted later (only if the step outgrows its trace) stays on the host."""
        spare = self.spare_room()
        if spare is None:  # no budget: everything stays on the device
            return
        room, keep = spare - reserve, []
        for cid in dict.fromkeys(self.trace + list(range(len(self.payload_bytes)))):
            if self.payload_bytes[cid] <= room:
                keep.append(cid)
                room -= self.payload_bytes[cid]
        for cid in sorted(set(self.resident) - set(keep)):
            self._evict(cid)
        for cid in keep:
            if cid not in self.resident:
                self._load(cid, ahead=False)
        self.static = True

    def _load_on_demand(self, cid: int) -> None:
        nbytes, limit = self.payload_bytes[cid], self._limit()
        victims = None if limit is None else self._plan(nbytes, limit, cid, self._next_use(cid))
        if victims is None:  # unlimited budget (all resident) or cheaper from the host
            self.counts["host_accesses"] += 1
            return
        for victim in victims:
            self._evict(victim)
        self._load(cid, ahead=False)

    def _shrink(self, keep: int) -> None:
        """Entering a position whose traced room is smaller: evict furthest-next-use first."""
        limit = self._limit()
        if limit is not None:
            for victim in self._plan(0, limit, keep, -1) or []:
                self._evict(victim)

    def _prefetch(self, current: int) -> None:
        """Load the payloads of the next positions (``prefetch_bytes`` of them) ahead of use.

        A payload needed at distance k is loaded only if the resident payloads plus it fit the
        least room (less the traced transient bytes) of every position until k, evicting only
        payloads used later than its use after k (the rule an access on demand applies), and
        only if that evicts no more than loading it at its use would (else a later access tries
        again): loading ahead moves loads earlier rather than adding transfers. The first
        payload that cannot be loaded now ends the look-ahead.
        """
        n, cur = len(self.trace), self._cur()
        lowest = self.room[cur] - self.transient_peak[cur]
        window, seen = 0, {current}
        for k in range(n):
            r = (self.pos + k) % n
            at_use = self.room[r] - self.transient_peak[r]
            lowest = min(lowest, at_use)
            cid = self.trace[r]
            if cid in seen:
                continue
            seen.add(cid)
            window += self.payload_bytes[cid]
            if window > self.prefetch_bytes:
                return
            if cid in self.resident:
                continue
            nbytes = self.payload_bytes[cid]
            if self.payload_used + nbytes > lowest and lowest < at_use:
                return  # it would evict more now than at its use: later
            limit = min(lowest + self.transient, self.room[cur])
            victims = self._plan(nbytes, limit, current, self._use_after(cid, k))
            if victims is None:
                return
            for victim in victims:
                self._evict(victim)
            self._load(cid, ahead=True)

    def _plan(self, nbytes: int, limit: int, keep: int, mine: int) -> list[int] | None:
        """Victims that make ``nbytes`` more fit under ``limit``, furthest next use first (least
        recently used in the warm-up), each used later than ``mine`` positions from now; None
        if that cannot be done."""
        need = self.used + nbytes - limit
        if need <= 0:
            return []
        candidates = [c for c in self.resident if c != keep]
        if self.tracing:
            candidates.sort(key=lambda c: self.resident[c])
        else:
            candidates.sort(key=self._next_use, reverse=True)
        victims = []
        for c in candidates:
            if not self.tracing and self._next_use(c) <= mine:
                return None
            victims.append(c)
            need -= self.payload_bytes[c]
            if need <= 0:
                return victims
        return None

    def _next_use(self, cid: int) -> int:
        """Trace positions from now to the next use of ``cid`` (wrapping into the next step)."""
        if self.tracing:
            return 0
        uses, n = self.uses.get(cid), len(self.trace)
        if not uses:
            return 2 * n + 1  # never used: the best victim
        pos = self.pos % n
        i = bisect.bisect_left(uses, pos)
        return uses[i] - pos if i < len(uses) else uses[0] + n - pos

    def _use_after(self, cid: int, k: int) -> int:
        """Positions from now to the first use of ``cid`` after the one ``k`` positions ahead."""
        n, pos = len(self.trace), self.pos % len(self.trace)
        uses, ahead = self.uses[cid], pos + k
        i = bisect.bisect_right(uses, ahead % n)
        nxt = uses[i] + ahead // n * n if i < len(uses) else uses[0] + (ahead // n + 1) * n
        return nxt - pos

    def _load(self, cid: int, ahead: bool) -> None:
        self._sample()
        self.payload_used += self.payload_bytes[cid]
        self.peak = max(self.peak, self.used)
        self.resident[cid] = self.clock
        self.counts["loads"] += 1
        if ahead:
            self.counts["prefetch_loads"] += 1
            self.prefetched.add(cid)
            self.transfers.load(cid)
            return
        if not self.tracing:
            self.counts["demand_loads"] += 1
        self.move(cid, True)

    def _evict(self, cid: int) -> None:
        self.transfers.ready(cid)
        self.move(cid, False)  # the device copy is gone before the accounting drops
        self._sample()
        del self.resident[cid]
        self.payload_used -= self.payload_bytes[cid]
        self.counts["evictions"] += 1
        if cid in self.prefetched:
            self.prefetched.discard(cid)
            self.counts["prefetch_wasted"] += 1

    @property
    def evictions(self) -> int:
        return self.counts["evictions"]

    def report(self) -> dict[str, float]:
        nonmodel = max(self.nonmodel + [self.head_nonmodel])
        return {
            "budget_bytes": self.budget or 0,
            "peak_device_bytes": self.peak,
            "budget_mb": (self.budget or 0) / MB,
            "peak_device_mb": self.peak / MB,
            "nonmodel_peak_bytes": nonmodel,
            "nonmodel_peak_mb": nonmodel / MB,
            "trace_positions": len(self.trace),
            "warmup_device_peak_bytes": self.warmup_device_peak,  # the probe resets the peak
            **self.counts,
            "resident_chunks": len(self.resident),
        }


COUNTERS = (
    "evictions",
    "loads",  # every host-to-device payload load (on demand and ahead)
    "demand_loads",  # loads on demand after the warm-up
    "prefetch_loads",  # loads ahead of use (side stream on CUDA)
    "prefetch_hits",  # accesses served by a payload loaded ahead
    "prefetch_wasted",  # payloads loaded ahead and evicted before their use
    "host_accesses",  # accesses served from the host (not worth a load, or no budget room)
    "in_use_evictions",  # payloads sent home while their chunk was being gathered (tight budget)
)
