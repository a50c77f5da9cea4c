"""All-gathers started ahead of use, in the order the warm-up step traced.

Without this, a chunk's all-gather (and, for a host-resident payload, the copy of its shard to
the device) runs when its module is about to compute, and the compute waits for it; PyTorch FSDP
prefetches the next module's all-gather for the same reason. With ``engine.gather_ahead = k``,
every gather of a training pass (forward or backward) starts the gathers of the next k chunks in
the order the warm-up step gathered them:

* on CUDA, on a dedicated stream that first waits for the compute queued so far (the chunk's
  buffer may be memory that compute just released), then runs the staging copy, the cast and the
  collective; an event is recorded after them, and the chunk's first use makes the current stream
  wait on it;
* on a CPU with several ranks, as an asynchronous collective (gloo runs it on its own threads),
  waited for at the chunk's first use; with one process it is the same copy, made early.

Every rank must issue its collectives in the same order, so nothing local decides whether a
gather starts ahead: the order is the model's, the same on every rank, and how many chunks the
budget has room for is agreed once, at the end of the warm-up, as the minimum over ranks
(``Engine``). A gather started ahead counts against the budget from its start; one never used is
waited for and released at the end of the backward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from myriad.engine.comm import Comm


class GatherOrder:
    """The chunk ids the warm-up step gathered, in order, and a cursor that follows them."""

    def __init__(self) -> None:
        self.trace: list[int] = []
        self.depth = 0  # chunks gathered ahead; set once the ranks have agreed on it
        self.cursor = 0

    def record(self, cid: int) -> None:
        self.trace.append(cid)

    def next_after(self, cid: int) -> list[int]:
        """The ``depth`` chunks the warm-up gathered after ``cid``'s next gather (searched from
        the cursor, never past the step's end: the optimizer changes every chunk there)."""
        if not self.depth:
            return []
        try:
            p = self.trace.index(cid, self.cursor)
        except ValueError:  # a gather the warm-up did not make here: no guess
            return []
        self.cursor = p + 1
        return self.trace[p + 1 : p + 1 + self.depth]

    def restart(self) -> None:
        self.cursor = 0


@dataclass
class Started:
    """One started gather: what its first use waits for, and the bytes to give back then."""

    nbytes: int  # staging (host shard copied to the device) and cast buffers, accounted
    wait: Callable[[], None] | None = None  # the asynchronous collective's wait (gloo)
    event: Any = None  # recorded on the gather stream after the gather (CUDA)
    device: torch.device | None = None  # the event's device
    keep: tuple[torch.Tensor, ...] = field(default=())  # read by the gather until it ends

    def finish(self, free: Callable[[int], None]) -> None:
        if self.wait is not None:
            self.wait()
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)
        self.keep = ()
        if self.nbytes:
            free(self.nbytes)


class Gatherer:
    """Issues one chunk's all-gather now (``ahead=False``) or to run beside the compute."""

    def __init__(self, device: torch.device, param_dtype: torch.dtype) -> None:
        self.device, self.param_dtype = device, param_dtype
        self._stream: Any = None

    def start(
        self, comm: Comm, full_C: torch.Tensor, shard_S: torch.Tensor, nbytes: int, ahead: bool
    ) -> Started:
        """All-gather ``shard_S`` (staged on the device and cast to ``param_dtype`` first, when
        needed) into ``full_C``; ``nbytes`` are the staging bytes the caller accounted."""
        stream = self._side_stream() if ahead else None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            src = shard_S.to(self.device, non_blocking=True).to(self.param_dtype)
            wait = comm.all_gather(full_C, src, async_op=ahead and stream is None)
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
                # The shard's memory may belong to the prefetch stream's pool: an eviction
                # there must not reuse it before this stream's gather has read it.
                if shard_S.is_cuda:
                    shard_S.record_stream(stream)
        # An eviction may repoint the payload while the gather still reads it: keep its storage.
        keep = (shard_S, src) if wait is not None or event is not None else ()
        return Started(nbytes, wait, event, self.device, keep)

    def _side_stream(self) -> Any:
        if self.device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        return self._stream
