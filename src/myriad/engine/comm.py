"""Collectives of one process group, with a clear error when a peer is gone.

World size 1 skips every collective (the same class serves one process and many). A collective
that fails (a peer died: gloo sees the socket close; or nobody answered within the group's
timeout) raises :class:`PeerLostError` naming the collective, the rank and the timeout, instead of
a backend traceback or a hang.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from myriad.errors import UserError


class PeerLostError(RuntimeError):
    """A collective failed because another rank died or stopped answering."""


@dataclass
class Comm:
    """One process group: ``rank`` of ``world`` (``group`` None means the default group)."""

    rank: int = 0
    world: int = 1
    group: Any = None
    timeout_s: float = 300.0

    @property
    def active(self) -> bool:
        return self.world > 1

    def _run(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            with torch.no_grad():
                return fn()
        except RuntimeError as exc:
            if not _is_peer_failure(exc):
                raise
            raise PeerLostError(
                f"{name} failed on rank {self.rank} of {self.world}: a peer process died or did "
                f"not answer within {self.timeout_s:g} s (engine.timeout_s); cause: "
                f"{str(exc).splitlines()[0][:200]}"
            ) from exc

    def all_gather(
        self, out: torch.Tensor, shard: torch.Tensor, async_op: bool = False
    ) -> Callable[[], None] | None:
        """``out`` = concatenation of every rank's ``shard`` (a copy with one rank). With
        ``async_op`` and several ranks the collective is only started: the function returned
        waits for it (``out`` and ``shard`` must not be touched before)."""
        if not self.active:
            out.copy_(shard)
            return None
        gather = lambda: _all_gather(out, shard, group=self.group, async_op=async_op)  # noqa: E731
        work = self._run("all_gather", gather)
        if work is None:
            return None
        return lambda: self._run("all_gather", work.wait)

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor) -> None:
        """``out`` = this rank's 1/world slice of the sum of every rank's ``full``."""
        if not self.active:
            out.copy_(full)
            return
        self._run("reduce_scatter", lambda: _reduce_scatter(out, full, group=self.group))

    def all_reduce(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        """Sum (or ``op``, a ``dist.ReduceOp``) over ranks, in place."""
        if self.active:
            op = dist.ReduceOp.SUM if op is None else op
            self._run("all_reduce", lambda: dist.all_reduce(t, op=op, group=self.group))
        return t

    def all_to_all(
        self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]
    ) -> None:
        """Rows ``inp`` split by ``in_splits`` to each rank; ``out`` receives ``out_splits``."""
        if not self.active:
            out.copy_(inp)
            return
        self._run(
            "all_to_all",
            lambda: dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group),
        )

    def barrier(self) -> None:
        if self.active:
            self._run("barrier", lambda: dist.barrier(group=self.group))


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_PEER_SIGNS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "closed", "socket")


def _is_peer_failure(exc: RuntimeError) -> bool:
    """Backend and network errors, as opposed to a local bug surfacing inside a collective."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(sign in text for sign in _PEER_SIGNS)


MIXED_NCCL = "cpu:gloo,cuda:nccl"  # CUDA tensors over NCCL, CPU tensors over gloo


def init_distributed(backend: str = "auto", timeout_s: float = 300.0) -> Comm:
    """Join the process group ``torchrun`` describes (one of one rank too: FSDP2 needs a group),
    else a 1-process Comm.

    ``backend`` "auto" is NCCL when CUDA is available, else gloo. NCCL comes with gloo beside it
    for CPU tensors: FSDP2's CPU offload reduces the gradient norm over CPU shards, which an
    NCCL-only group refuses once there are two ranks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ  # torchrun's environment
    if world <= 1 and not launched:
        return Comm(timeout_s=timeout_s)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        backend = MIXED_NCCL
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"could not join the process group ({backend}): {exc}") from None
    return Comm(dist.get_rank(), dist.get_world_size(), None, timeout_s)


def collective_device_type() -> str:
    """Where the default group's collectives take tensors: CUDA where NCCL serves, else the CPU."""
    return "cuda" if "nccl" in str(dist.get_backend()) else "cpu"


def local_device(comm: Comm, device: torch.device) -> torch.device:
    """On CUDA each rank takes GPU ``LOCAL_RANK`` (torchrun sets it)."""
    if device.type == "cuda" and comm.active:
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device
