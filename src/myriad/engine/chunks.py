"""The chunk store: parameters packed into fixed-size chunks, each rank owning 1/N of each.

A chunk is a flat buffer of ``capacity`` elements holding whole parameters back to back (in order
of first use). Every model parameter's ``.data`` is a view into its chunk's ``full`` buffer, whose
storage exists only while the chunk is *gathered* (all-gathered from the owners' shards just
before a module uses it) and is released (storage resized to 0) after. The views, and the
tensors autograd saved for backward, stay valid across release and re-gather because the
storage object itself is kept; this is how PyTorch's FSDP1 freed parameters too.

What each rank keeps for good is the chunk's *payload*: its shard of the parameters (the fp32
master copy), of the gradients (in ``reduce`` dtype, see ``precision``), and the Adam moments.
The full buffer and the parameter views are in ``param`` dtype (fp32 unless mixed precision).
Payload tensors are fixed objects whose ``.data`` moves between the device and the host tier,
so the optimizer keys on them unchanged.

Shape legend: C chunk capacity (elements), S = C / world shard elements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from myriad.engine.comm import Comm
from myriad.engine.gather_ahead import Gatherer, GatherOrder, Started
from myriad.engine.grad_writer import GradWriter
from myriad.engine.optim import shard_param
from myriad.engine.placement import MemoryManager
from myriad.engine.precision import MASTER, Precision


@dataclass
class Slot:
    """Where one parameter lives in its chunk."""

    name: str
    param: nn.Parameter
    offset: int
    numel: int
    shape: torch.Size


@dataclass
class Chunk:
    """One fixed-size chunk: its layout, its full buffer and this rank's payload."""

    index: int
    comm: Comm  # the group that shares this chunk (world for dense, one rank for local experts)
    capacity: int  # C, a multiple of comm.world
    decay: bool  # weight decay applies (2-D and larger parameters)
    slots: list[Slot] = field(default_factory=list)
    full_C: torch.Tensor | None = None  # storage present only while gathered
    grad_C: torch.Tensor | None = None  # full gradient, only during this chunk's backward
    shard_S: torch.Tensor | None = None  # master parameter shard (the optimizer's "param")
    grad_S: torch.Tensor | None = None  # gradient shard (shard_S.grad itself when fp32)
    gathered: bool = False
    grad_clean: bool = True  # grad_S holds no gradient: the next reduced one is copied, not added
    params_in_grad: bool = False  # ... it holds the parameters in param dtype (``reset_grad``)
    pending: int = 0  # parameters still to receive their gradient in this backward

    @property
    def shard_numel(self) -> int:
        return self.capacity // self.comm.world

    @property
    def used(self) -> int:
        return sum(s.numel for s in self.slots)

    def shard_range(self) -> tuple[int, int]:
        start = self.comm.rank * self.shard_numel
        return start, start + self.shard_numel


def pack(
    named: list[tuple[str, nn.Parameter]], chunk_numel: int, comm: Comm, decay: bool, first: int
) -> list[Chunk]:
    """Greedy packing in the given order; the capacity fits the largest parameter and divides
    evenly among ranks, so every rank's shard has the same length. Each chunk is then trimmed
    to the parameters it holds (rounded up to the world size): nothing pools equal-sized chunk
    buffers, so the padding a fixed size leaves when a big parameter does not fit would only
    be payload memory (47 % of the matrices of ``benchmarks/engine.py``'s model at 4 MB)."""
    if not named:
        return []
    biggest = max(p.numel() for _, p in named)
    total = sum(p.numel() for _, p in named)
    capacity = max(min(chunk_numel, total), biggest)  # a small group gets one small chunk
    capacity = -(-capacity // comm.world) * comm.world
    chunks: list[Chunk] = []
    offset = capacity
    for name, p in named:
        if offset + p.numel() > capacity:
            chunks.append(Chunk(first + len(chunks), comm, capacity, decay))
            offset = 0
        chunks[-1].slots.append(Slot(name, p, offset, p.numel(), p.shape))
        offset += p.numel()
    for chunk in chunks:
        chunk.capacity = -(-chunk.used // comm.world) * comm.world
    return chunks


class ChunkStore:
    """All chunks of a model and the param → chunk index; owns gather, release and grad reduce.

    ``device`` is where full chunks live while in use (the compute device); payloads move
    between it and the host as the memory manager decides (``move_payload``).
    """

    def __init__(
        self, chunks: list[Chunk], device: torch.device, precision: Precision | None = None
    ) -> None:
        self.chunks = chunks
        self.device = device
        self.precision = precision or Precision()
        self.index: dict[nn.Parameter, Chunk] = {}
        for chunk in chunks:
            for slot in chunk.slots:
                self.index[slot.param] = chunk
        self.manager: MemoryManager | None = None  # set by the engine
        self.order = GatherOrder()
        self.gatherer = Gatherer(device, self.precision.param)
        self.grad_writer = GradWriter(free=self._free_bytes)
        self.ahead: dict[int, Started] = {}  # chunk id -> its gather started ahead, unused yet
        self.counts = {"gathers_ahead": 0, "gathers_ahead_unused": 0, "gathers_from_grad": 0}
        p = self.precision
        self.refill = p.param == p.reduce != MASTER  # see ``reset_grad``

    def _free_bytes(self, nbytes: int) -> None:
        if self.manager is not None:
            self.manager.free(nbytes)

    def materialize(self) -> None:
        """Copy each parameter's current values into its chunk, keep this rank's shard (fp32
        master and gradient shard), point the parameter at a view of the (then released) full
        buffer, which is in ``param`` dtype."""
        for chunk in self.chunks:
            values_C = torch.zeros(chunk.capacity, dtype=MASTER, device=self.device)
            for slot in chunk.slots:
                values_C[slot.offset : slot.offset + slot.numel].copy_(slot.param.detach().view(-1))
            start, end = chunk.shard_range()
            chunk.shard_S = shard_param(values_C[start:end].clone(), self.precision.reduce)
            chunk.grad_S = (
                chunk.shard_S.grad
                if self.precision.grad_is_master
                else torch.zeros_like(chunk.shard_S, dtype=self.precision.reduce)
            )
            if self.precision.param == MASTER:
                full_C = values_C
            else:
                full_C = values_C.to(self.precision.param)
                del values_C
            for slot in chunk.slots:
                view = full_C[slot.offset : slot.offset + slot.numel].view(slot.shape)
                slot.param.data = view
            chunk.full_C = full_C
            _free(full_C)

    def chunks_of(self, params: list[nn.Parameter]) -> list[Chunk]:
        seen: dict[int, Chunk] = {}
        for p in params:
            chunk = self.index.get(p)
            if chunk is not None:
                seen.setdefault(chunk.index, chunk)
        return list(seen.values())

    def full_bytes(self, chunk: Chunk) -> int:
        """The gathered parameters (``param`` dtype)."""
        return chunk.capacity * self.precision.param_size

    def grad_bytes(self, chunk: Chunk) -> int:
        """The full gradient buffer during the chunk's backward (``reduce`` dtype)."""
        return chunk.capacity * self.precision.reduce_size

    def shard_bytes(self, chunk: Chunk) -> int:
        """One fp32 master shard (staged on the device when its payload is on the host)."""
        return chunk.shard_numel * 4

    def gather(self, chunk: Chunk, follow: bool = False) -> bool:
        """Make the chunk's full buffer hold its parameters, all-gathered from the owners' shards.

        Returns whether this is the chunk's first use since its release: it was gathered now, or
        a gather started ahead has finished now. ``follow`` marks a training pass's gather: the
        warm-up records it, later ones start the next chunks' gathers (``gather_ahead``)."""
        started = self.ahead.pop(chunk.index, None)
        if chunk.gathered and started is None:
            return False
        assert self.manager is not None
        if torch.is_grad_enabled():
            self.manager.touch(chunk.index)
        (started or self._start_gather(chunk, ahead=False)).finish(self.manager.free)
        if follow:
            self._follow(chunk)
        return True

    def _start_gather(self, chunk: Chunk, ahead: bool) -> Started:
        assert chunk.full_C is not None and chunk.shard_S is not None and self.manager is not None
        self.manager.ready(chunk.index)  # a payload loaded ahead: wait for its copy
        self.manager.alloc(self.full_bytes(chunk), keep=chunk.index)
        _alloc(chunk.full_C)
        source = chunk.grad_S if chunk.params_in_grad else chunk.shard_S
        assert source is not None
        self.counts["gathers_from_grad"] += chunk.params_in_grad
        shard_S = source.data
        # A host payload, staged on the device (counted). Types, not devices: a one-GPU engine's
        # device is "cuda" while its payloads sit on "cuda:0".
        staged = shard_S.device.type != self.device.type
        cast = self.precision.param != shard_S.dtype  # all-gather the shard cast to param dtype
        cast_bytes = chunk.shard_numel * self.precision.param_size
        nbytes = chunk.shard_numel * shard_S.element_size() * staged + cast_bytes * cast
        if nbytes:
            self.manager.alloc(nbytes, keep=chunk.index)
        chunk.gathered = True
        return self.gatherer.start(chunk.comm, chunk.full_C, shard_S, nbytes, ahead)

    def _follow(self, chunk: Chunk) -> None:
        assert self.manager is not None
        if self.manager.tracing:
            self.order.record(chunk.index)
            return
        for cid in self.order.next_after(chunk.index):
            nxt = self.chunks[cid]
            if not nxt.gathered:
                self.ahead[cid] = self._start_gather(nxt, ahead=True)
                self.counts["gathers_ahead"] += 1

    def gather_master(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's fp32 master values in full, for checkpoints (a collective). With fp32
        parameters that is the gathered chunk (release it after); otherwise a temporary fp32
        all-gather outside the budget (checkpoint time, not the training step)."""
        if self.precision.param == MASTER:
            self.gather(chunk)
            assert chunk.full_C is not None
            return chunk.full_C
        assert chunk.shard_S is not None and self.manager is not None
        self.manager.ready(chunk.index)
        master_C = torch.empty(chunk.capacity, dtype=MASTER, device=self.device)
        chunk.comm.all_gather(master_C, chunk.shard_S.data.to(self.device))
        return master_C

    def release(self, chunk: Chunk) -> None:
        if not chunk.gathered:
            return
        assert chunk.full_C is not None and self.manager is not None
        started = self.ahead.pop(chunk.index, None)
        if started is not None:  # gathered ahead, never used: its collective must end first
            started.finish(self.manager.free)
            self.counts["gathers_ahead_unused"] += 1
        _free(chunk.full_C)
        self.manager.free(self.full_bytes(chunk))
        chunk.gathered = False

    def begin_backward(self, chunk: Chunk) -> None:
        """First backward use of a chunk: gather it and open a zeroed full gradient buffer."""
        if chunk.grad_C is not None:
            return
        assert self.manager is not None
        self.gather(chunk, follow=True)
        self.manager.alloc(self.grad_bytes(chunk), keep=chunk.index)
        chunk.grad_C = torch.zeros(chunk.capacity, dtype=self.precision.reduce, device=self.device)
        chunk.pending = len(chunk.slots)

    def add_grad(self, param: nn.Parameter) -> None:
        """A parameter's gradient is complete: move it into the chunk gradient; reduce the chunk
        once all its parameters are done."""
        chunk = self.index[param]
        if chunk.grad_C is None:  # gradient arrived without a module pre-backward hook
            self.begin_backward(chunk)
        assert chunk.grad_C is not None and param.grad is not None
        slot = next(s for s in chunk.slots if s.param is param)
        chunk.grad_C[slot.offset : slot.offset + slot.numel].add_(param.grad.view(-1))
        param.grad = None
        chunk.pending -= 1
        if chunk.pending == 0:
            self.reduce(chunk)

    def reduce(self, chunk: Chunk) -> None:
        """Reduce-scatter the chunk's gradient into the owner's shard (mean over ranks) and
        release the chunk's full buffers."""
        assert chunk.grad_C is not None and chunk.grad_S is not None and self.manager is not None
        self.manager.touch(chunk.index)
        out_bytes = chunk.shard_numel * self.precision.reduce_size
        self.manager.alloc(out_bytes, keep=chunk.index)
        out_S = torch.empty(chunk.shard_numel, dtype=self.precision.reduce, device=self.device)
        chunk.comm.reduce_scatter(out_S, chunk.grad_C)
        if chunk.comm.world > 1:
            out_S.div_(chunk.comm.world)
        held = self.grad_writer.write(chunk.index, chunk.grad_S, out_S, chunk.grad_clean)
        chunk.grad_clean = chunk.params_in_grad = False
        del out_S
        if not held:  # else the writer frees it once its copy to the host has landed
            self.manager.free(out_bytes)
        chunk.grad_C = None
        self.manager.free(self.grad_bytes(chunk))
        self.release(chunk)

    @torch.no_grad()
    def reset_grad(self, chunk: Chunk) -> None:
        """After the optimizer step: zero the gradient shard or, when gradients and gathered
        parameters share a low-precision dtype, fill it with the updated parameters in that dtype
        (PatrickStar's trick). Until the chunk's next reduce writes its gradient there, gathers
        read the parameters from it: a host payload uploads half the master's bytes, and nothing
        is cast. This costs no memory: the gradient shard holds no gradient meanwhile."""
        assert chunk.grad_S is not None and chunk.shard_S is not None
        if self.refill:
            chunk.grad_S.copy_(chunk.shard_S.data)
        else:
            chunk.grad_S.zero_()
        chunk.grad_clean, chunk.params_in_grad = True, self.refill
        self.grad_writer.squares.pop(chunk.index, None)

    @torch.no_grad()
    def forget_params(self, chunk: Chunk) -> None:
        """The gradient shard holds parameters no longer wanted there (the chunk got no gradient,
        or its master was overwritten): zero it."""
        assert chunk.grad_S is not None
        if chunk.grad_S.device.type == "cpu" and self.device.type == "cuda":
            # a gather may still be copying from it: the current stream waited for every gather
            torch.cuda.current_stream(self.device).synchronize()
        chunk.grad_S.zero_()
        chunk.params_in_grad = False

    def finish_backward(self) -> None:
        """Reduce chunks some of whose parameters got no gradient this pass; release the rest."""
        for chunk in self.chunks:
            if chunk.grad_C is not None:
                self.reduce(chunk)
            self.release(chunk)
        self.order.restart()
        if self.manager is not None:  # the clip and the optimizer read every payload next;
            self.manager.settle()  # and a load still landing must not undo the zeroing below
        for chunk in self.chunks:  # no gradient this step: its parameters must not pass for one
            if chunk.params_in_grad:
                self.forget_params(chunk)
        self.grad_writer.wait_all()


def _free(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


def _alloc(t: torch.Tensor) -> None:
    nbytes = t.numel() * t.element_size()
    if t.untyped_storage().size() != nbytes:
        t.untyped_storage().resize_(nbytes)
