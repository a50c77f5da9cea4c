"""Sharded trainer checkpoints (``engine.kind = "myriad"`` or ``"fsdp2"``): every rank writes
its own part of one step directory, and the directory appears whole or not at all.

``<run>/checkpoints/step-NNNNNN/`` then holds ``config.json`` and ``trainer_state.json`` (rank
0), every rank's ``trainer_state-rankR.pt`` (schedule, optimizer hyper-parameters, RNG, data
position, progress, routing monitor: what an exact resume of that rank needs besides its
parameter and optimizer shards) and those shards (``runtime.CheckpointParts``):

* ``myriad``: every rank's ``engine-rankR-of-W.safetensors`` / ``.json`` (parameter shards, Adam
  moments, layout; ``myriad.engine.shards``). No process ever holds the whole model;
  ``checkpoint.load_weights`` and ``myriad export`` read the shards.
* ``fsdp2``: ``dcp/`` (``torch.distributed.checkpoint``: every rank's parameter and optimizer
  shards); ``checkpoint.load_weights`` and ``myriad export`` read them one tensor at a time
  (``myriad.engine.dcp_weights``).

Both reshard: ``--resume`` works with another number of processes (see :func:`check_resume`).

Atomicity across processes: rank 0 creates one temporary directory with an agreed name (behind a
collective), every rank writes into it, and an all-reduce of per-rank failure flags tells every
rank whether all succeeded. If one failed (e.g. a full disk), rank 0 removes the directory and
every rank raises a one-line ``UserError``; the previous checkpoint and ``latest`` are untouched.
Otherwise rank 0 fsyncs the directory, renames it into place and moves ``latest``, and a last
flag tells the others it did. All ranks must see one file system (one node, or a shared one).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from myriad.engine.runtime import CheckpointParts
from myriad.errors import UserError
from myriad.train import checkpoint

_DAMAGED = (OSError, ValueError, SafetensorError)  # ValueError: bad JSON in a layout file


def rank_state_name(rank: int) -> str:
    return f"trainer_state-rank{rank}.pt"


SHARDED_KINDS = ("myriad", "fsdp2")


def checkpoint_root(out_dir: Path, kind: str) -> Path:
    """This process's ``checkpoints`` directory: sharded runs share rank 0's (every rank writes
    its part of each step directory); ``out_dir`` is ``runtime.rank_dir`` (``<run>/rank-R`` for
    ranks > 0)."""
    if kind in SHARDED_KINDS and int(os.environ.get("RANK", "0")) > 0:
        return out_dir.parent / "checkpoints"
    return out_dir / "checkpoints"


def written_world(step_dir: Path) -> int | None:
    """How many processes wrote a sharded checkpoint; None for a consolidated one."""
    from myriad.engine.dcp_weights import DCP_DIR

    world = checkpoint.shard_world(step_dir)
    if world is None and (step_dir / DCP_DIR).is_dir():
        summary = step_dir / checkpoint.STATE_JSON
        processes = checkpoint.read_json(summary).get("processes")
        if not isinstance(processes, int) or processes < 1:
            raise UserError(f"corrupt checkpoint file {summary}: no valid 'processes' entry")
        world = processes
    return world


def check_resume(step_dir: Path, kind: str) -> str | None:
    """Refuse a resume the checkpoint cannot serve; describe a change of world size.

    Sharded checkpoints reshard to any number of processes (parameters and optimizer moments,
    expert rows included). Each rank keeps its own data position and RNG; a rank the checkpoint
    lacks takes rank 0's (see :func:`load_rank`). Returns a line for the log when the world size
    changes, else None.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    written = written_world(step_dir)
    if written is None:
        if kind in SHARDED_KINDS and world > 1:
            raise UserError(
                f"cannot resume {step_dir} with {world} processes: it holds consolidated weights, "
                f"not per-rank shards; start a new run from it with --init-from {step_dir}"
            )
        wrote = checkpoint.read_json(step_dir / checkpoint.STATE_JSON).get("processes", world)
        if wrote != world:  # its optimizer state may hold that many ranks' shards
            raise UserError(
                f"cannot resume {step_dir} with {world} process(es): it was written by {wrote} "
                f"as one consolidated checkpoint; resume with {wrote}, or start a new run from "
                f"its weights with --init-from {step_dir}"
            )
        return None
    if written == world:
        return None
    data = (
        f"the data streams of ranks >= {world} end"
        if world < written
        else f"ranks >= {written} start at rank 0's data position"
    )
    return (
        f"resume: {written} process(es) wrote {step_dir.name}, {world} resume it; "
        f"parameters and Adam moments reshard, {data}"
    )


def save_sharded_checkpoint(
    root: Path,
    *,
    step: int,
    parts: CheckpointParts,
    config: dict[str, Any],
    state: dict[str, Any],
    summary: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write step ``step`` of every rank into ``root`` atomically; a collective (all ranks call it).

    Args:
        parts: this rank's parameter and optimizer shards (and its comm).
        state: this rank's trainer state (without optimizer moments: they are in the shards).
        summary: rank 0's ``trainer_state.json``.

    Raises:
        UserError: some rank could not write (on every rank); the previous checkpoint is intact.
    """
    rank = parts.comm.rank
    final = root / checkpoint.step_dir_name(step)
    tmp = root / f"{checkpoint.TMP_PREFIX}{final.name}-shards"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temps(root)
        tmp.mkdir()

    def see() -> None:  # its own round: fsdp2's write is a collective every rank must reach
        if not tmp.is_dir():  # else save_shards would create a directory no one publishes
            raise UserError(
                f"rank {rank} does not see {tmp}, which rank 0 created: the --out of a "
                "multi-node myriad run must be on a file system every node shares"
            )

    def write() -> None:
        parts.write(tmp)
        _write_synced(tmp / rank_state_name(rank), lambda p: checkpoint._write_state(p, state))
        if rank == 0:
            _write_synced(tmp / checkpoint.CONFIG, lambda p: checkpoint.write_json(p, config))
            _write_synced(tmp / checkpoint.STATE_JSON, lambda p: checkpoint.write_json(p, summary))

    def publish() -> None:
        for sub in tmp.iterdir():  # fsdp2's dcp/: torch fsyncs its files, not their directory
            if sub.is_dir():
                checkpoint.fsync_dir(sub)
        checkpoint.fsync_dir(tmp)
        checkpoint.move_into_place(tmp, final)
        checkpoint.fsync_dir(root)
        checkpoint.write_latest(root, final.name)

    _all_or_none(parts, final, tmp, prepare if rank == 0 else None)
    _all_or_none(parts, final, tmp, see)
    _all_or_none(parts, final, tmp, write)
    _all_or_none(parts, final, tmp, publish if rank == 0 else None)
    if keep > 0 and rank == 0:
        checkpoint.prune_checkpoints(root, keep)
    return final


def _write_synced(path: Path, write: Callable[[Path], object]) -> None:
    write(path)
    checkpoint.fsync_file(path)


def _attempt(action: Callable[[], None] | None) -> Exception | None:
    """Run ``action`` (None: nothing); its error is returned, not raised, so that this rank
    still reaches the all-reduce that follows (or every rank would hang)."""
    try:
        if action is not None:
            action()
    except Exception as exc:
        return exc
    return None


def _failed_ranks(parts: CheckpointParts, error: Exception | None) -> str:
    """Every rank's outcome (a collective): the failed ranks, comma-separated; '' when none."""
    failed_W = torch.zeros(parts.comm.world, dtype=torch.int64, device=parts.device)  # W ranks
    failed_W[parts.comm.rank] = int(error is not None)
    parts.comm.all_reduce(failed_W)
    return ", ".join(str(r) for r in failed_W.nonzero().flatten().tolist())


def _all_or_none(
    parts: CheckpointParts, final: Path, tmp: Path, action: Callable[[], None] | None
) -> None:
    """Run ``action`` here (None: nothing), then agree with every rank on whether all succeeded.

    Failure anywhere: rank 0 removes ``tmp`` before anyone returns, and every rank raises (the
    failing rank its own cause: a ``UserError`` for a failed write, ``checkpoint.write_failure``,
    else the original error).
    """
    error = _attempt(action)
    ranks = _failed_ranks(parts, error)
    if not ranks:
        return
    if parts.comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    parts.comm.barrier()  # the temporary directory is gone before any rank raises
    failure = checkpoint.write_failure(error) if error is not None else None
    if error is not None and failure is None:
        raise error
    cause = f": {failure}" if failure is not None else ""
    raise UserError(
        f"could not save checkpoint {final}: rank {ranks} failed to write{cause}; "
        "the previous checkpoint is intact"
    ) from error


def load_rank(parts: CheckpointParts, step_dir: Path) -> tuple[dict[str, Any], bool]:
    """Fill this rank's parameter and optimizer shards from ``step_dir``, and return this rank's
    trainer state (``trainer_state-rankR.pt``) and whether it is this rank's own.

    A rank beyond the world that wrote the checkpoint gets rank 0's state (schedule, RNG, data
    position, all alike across ranks but the data seed); the caller moves its own data stream
    to that position. A collective: if any rank cannot read its part, every rank raises (rather
    than the others training on and waiting for it)."""
    rank = parts.comm.rank
    own = rank < (written_world(step_dir) or 1)
    loaded: dict[str, Any] = {}

    def load() -> None:  # the parts first: fsdp2's read is a collective, reached by every rank
        parts.read(step_dir)
        loaded["state"] = checkpoint.load_state(step_dir, rank_state_name(rank if own else 0))

    error = _attempt(load)
    ranks = _failed_ranks(parts, error)
    if isinstance(error, _DAMAGED):  # a damaged shard or layout file
        raise UserError(f"corrupt or truncated engine shard files in {step_dir}: {error}") from None
    if error is not None:  # a UserError naming its file, or a bug (not relabelled)
        raise error
    if ranks:
        raise UserError(f"cannot resume from {step_dir}: rank {ranks} could not read its part")
    return loaded["state"], own
