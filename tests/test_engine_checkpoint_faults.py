"""Checkpoint faults as the file system really reports them, not as mocks raise them: a write past
``RLIMIT_FSIZE`` fails as on a full disk (``EFBIG`` instead of ``ENOSPC``), inside safetensors,
``torch.save`` and ``torch.distributed.checkpoint`` alike; damaged shard files; and export dtypes.

Every failed save must leave the previous checkpoint and ``latest`` as they were, no temporary
directory, and on every rank a one-line ``UserError`` (no traceback)."""

from __future__ import annotations

import dataclasses
import json
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_engine_support import (
    apply_engine,
    batches,
    build_model,
    init_rank,
    make_step,
    run_config,
    spawn,
)

from myriad.engine.comm import Comm
from myriad.engine.runtime import CheckpointParts, checkpoint_parts
from myriad.engine.shards import save_shards
from myriad.errors import UserError
from myriad.train import checkpoint
from myriad.train.shard_checkpoint import load_rank, save_sharded_checkpoint


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Writes beyond ``nbytes`` of any file fail with ``OSError(EFBIG)``, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _save(root: Path, step: int, parts: CheckpointParts) -> None:
    state = {"step": step, "rng": torch.get_rng_state()}
    save_sharded_checkpoint(
        root, step=step, parts=parts, config={}, state=state, summary={"step": step, "processes": 2}
    )


def _failed_save(root: Path, parts: CheckpointParts, fail: bool) -> dict:
    """Step 1 saved; step 2 with writes failing on this rank if ``fail``: what each rank saw."""
    _save(root, 1, parts)
    error = "no error"
    try:
        with file_size_limit(4096) if fail else nullcontext():
            _save(root, 2, parts)
    except UserError as exc:
        error = f"UserError: {exc}"
    except BaseException as exc:  # noqa: BLE001  # what the user would see as a traceback
        error = f"{type(exc).__name__}: {exc}"
    dist.barrier()
    return {"error": error, "entries": sorted(p.name for p in root.iterdir())}


def _myriad_rank(rank: int, world: int, port: int, out: str) -> None:
    comm = init_rank(rank, world, port)
    cfg = run_config()
    model = build_model(cfg)
    engine = apply_engine(model, comm, chunk_mb=0.02, expert_parallel=True)
    step_fn = make_step(model, cfg, engine)
    step_fn([batches(0, world)[rank]])
    parts = checkpoint_parts(engine, model, step_fn.optimizer)
    assert parts is not None
    seen = _failed_save(Path(out) / "checkpoints", parts, fail=rank == 1)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


def _fsdp2_parts(rank: int, world: int, port: int) -> CheckpointParts:
    """A two-layer FSDP2 model after one step, as checkpoint parts (its write is a collective)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from myriad.engine import fsdp2

    comm = init_rank(rank, world, port, timeout_s=20.0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 64)).sum().backward()
    optimizer.step()
    return CheckpointParts(
        comm,
        torch.device("cpu"),
        lambda d: fsdp2.save_sharded(model, optimizer, d),
        lambda d: fsdp2.load_sharded(model, optimizer, d),
        lambda d: True,
    )


def _fsdp2_rank(rank: int, world: int, port: int, out: str) -> None:
    parts = _fsdp2_parts(rank, world, port)
    root = Path(out) / "checkpoints"
    seen = _failed_save(root, parts, fail=rank == 1)
    step1 = root / "step-000001"
    if rank == 1:  # a damaged trainer state on one rank: both ranks fail the resume at once
        state = step1 / "trainer_state-rank1.pt"
        state.write_bytes(state.read_bytes()[:50])
    dist.barrier()
    try:
        load_rank(parts, step1)
        seen["resume"] = "no error"
    except UserError as exc:
        seen["resume"] = f"UserError: {exc}"
    except BaseException as exc:  # noqa: BLE001
        seen["resume"] = f"{type(exc).__name__}: {exc}"
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["myriad", "fsdp2"])
def test_full_disk_on_one_rank_is_a_one_line_error_everywhere(tmp_path, kind):
    """Rank 1's writes fail for real (safetensors / dcp report it in their own error types):
    both ranks raise one line naming the cause; step 1 and ``latest`` stay, nothing else."""
    spawn(_myriad_rank if kind == "myriad" else _fsdp2_rank, 2, str(tmp_path))
    root = tmp_path / "checkpoints"
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for s in seen:
        assert s["entries"] == ["latest", "step-000001"], s
        assert s["error"].startswith("UserError: could not save checkpoint"), s["error"]
        assert f"{root / 'step-000002'}: rank 1 failed to write" in s["error"]  # rank 1 only
        assert s["error"].endswith("the previous checkpoint is intact")
        assert len(s["error"].splitlines()) == 1
    assert "File too large" in seen[1]["error"]
    assert (root / "latest").read_text().strip() == "step-000001"
    if kind == "fsdp2":  # the resume: each rank its own one-line error, no hang
        assert seen[1]["resume"].startswith("UserError: corrupt or truncated trainer state")
        assert seen[0]["resume"] == (
            f"UserError: cannot resume from {root / 'step-000001'}: rank 1 could not read its part"
        )


def _blind_rank(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 does not see rank 0's temporary directory (no shared file system)."""
    parts = _fsdp2_parts(rank, world, port)
    real_is_dir = Path.is_dir

    def is_dir(path: Path) -> bool:
        return not path.name.startswith(checkpoint.TMP_PREFIX) and real_is_dir(path)

    seen = "no error"
    try:
        with mock.patch.object(Path, "is_dir", is_dir) if rank == 1 else nullcontext():
            _save(Path(out) / "checkpoints", 1, parts)
    except UserError as exc:
        seen = f"UserError: {exc}"
    except BaseException as exc:  # noqa: BLE001
        seen = f"{type(exc).__name__}: {exc}"
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


def test_a_rank_without_the_shared_folder_fails_before_the_collective_write(tmp_path):
    """FSDP2's write is a collective: a rank that cannot see the temporary directory must say so
    in a round of its own, or the others wait inside ``dcp.save`` until the timeout."""
    spawn(_blind_rank, 2, str(tmp_path))
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[1].startswith("UserError: rank 1 does not see "), seen[1]
    assert seen[0].startswith("UserError: could not save checkpoint"), seen[0]
    assert "rank 1 failed to write" in seen[0]
    assert not (tmp_path / "checkpoints" / "latest").exists()


def _tiny_run(router_input: str = "hidden"):
    cfg = run_config()
    moe = dataclasses.replace(cfg.model.moe, router_input=router_input)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))
    model = build_model(cfg)
    engine = apply_engine(model, Comm(), chunk_mb=0.05)
    return cfg, model, engine


def test_full_disk_in_a_consolidated_save_is_a_one_line_error(tmp_path):
    """The weights (safetensors) or the trainer state with its moments (``torch.save``) hit the
    limit: a ``UserError`` naming the cause; step 1 stays, no temporary directory."""
    cfg = run_config()
    model = build_model(cfg)
    step_fn = make_step(model, cfg, None)
    step_fn(batches(0, 1))
    root = tmp_path / "checkpoints"
    state = {"optimizer": step_fn.optimizer.state_dict()}  # about twice the weights' bytes

    def save(step: int) -> None:
        checkpoint.save_checkpoint(
            root, step=step, model=model, config={}, state=state, summary={"step": step}
        )

    save(1)
    weights = (root / "step-000001" / checkpoint.WEIGHTS).stat().st_size
    for limit in (4096, weights + 4096):  # in the weights; in the trainer state
        with pytest.raises(UserError) as caught, file_size_limit(limit):
            save(2)
        message = str(caught.value)
        assert message.startswith(f"could not save checkpoint {root / 'step-000002'}: ")
        assert "File too large" in message and message.endswith("previous checkpoint is intact")
        assert len(message.splitlines()) == 1
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]


def test_damaged_shard_file_error_names_the_file(tmp_path):
    """A truncated shard or a garbled layout: one line naming that file, for every reader."""
    _, _, engine = _tiny_run()
    shards = tmp_path / "shards"
    save_shards(engine, shards)
    data = next(shards.glob("engine-rank*.safetensors"))
    layout = data.with_suffix(".json")
    good = data.read_bytes()
    data.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError) as caught:
        checkpoint.export_weights(shards, tmp_path / "m.safetensors")
    message = str(caught.value)
    assert f"{shards}: {data.name}: " in message and len(message.splitlines()) == 1
    data.write_bytes(good)
    layout.write_text("{", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        checkpoint.export_weights(shards, tmp_path / "m.safetensors")
    message = str(caught.value)
    assert f"{shards}: {layout.name}: " in message and len(message.splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_export_that_cannot_finish_leaves_no_file_or_new_folder(tmp_path):
    """The disk fills mid-export: one line naming the output; neither the file nor the folders
    made for it remain."""
    _, _, engine = _tiny_run()
    save_shards(engine, tmp_path / "shards")
    out = tmp_path / "new" / "dir" / "m.safetensors"
    with pytest.raises(UserError) as caught, file_size_limit(4096):
        checkpoint.export_weights(tmp_path / "shards", out)
    message = str(caught.value)
    assert message.startswith(f"cannot write {out}: ") and "File too large" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_shard_files_of_other_ranks_are_not_a_complete_set(tmp_path):
    """As many files as the world size, but not ranks 0..W-1 (a rank's files renamed or
    written under two spellings): refused, not read as a checkpoint."""
    from myriad.engine.shards import ShardReader

    _, _, engine = _tiny_run()
    shards = tmp_path / "shards"
    save_shards(engine, shards)
    for path in shards.glob("engine-rank00000-of-00001.*"):
        path.rename(path.with_name(path.name.replace("rank00000", "rank00003")))
    with pytest.raises(UserError, match="no complete set of engine shard files"):
        ShardReader(shards)


def test_export_keeps_every_tensors_dtype(tmp_path):
    """Word-vector routing keeps int64 and bool buffers: the export stores them as such (as a
    consolidated checkpoint does), not as fp32, and the readers load them back exactly."""
    cfg, model, engine = _tiny_run(router_input="word")
    with torch.no_grad():
        model.word_router.frozen_ids_VK.copy_(torch.randint(0, 4, (cfg.model.vocab_size, 2)))
        model.word_router.frozen.fill_(True)
    save_shards(engine, tmp_path / "shards")
    exported = load_file(checkpoint.export_weights(tmp_path / "shards", tmp_path / "m.st"))
    buffers = dict(model.named_buffers())
    for short in ("frozen_ids_VK", "frozen", "frozen_weights_VK"):
        name = f"word_router.{short}"
        assert exported[name].dtype == buffers[name].dtype, name
        assert torch.equal(exported[name], buffers[name]), name
    assert all(t.dtype == torch.float32 for n, t in exported.items() if n not in buffers)
    assert checkpoint.read_shard_weights(tmp_path / "shards")["word_router.frozen"].dtype == (
        torch.bool
    )


def test_published_step_directory_is_durable_to_its_subdirectories(tmp_path, monkeypatch):
    """Before ``latest`` moves, every directory of the step is fsynced: fsdp2's ``dcp/`` too
    (torch fsyncs the files it writes there, not their directory entries), else a power loss
    could leave ``latest`` naming a step whose ``dcp/`` lost its shard files."""
    import os

    def write(directory: Path) -> None:  # the shape of fsdp2's parts: files in a subdirectory
        (directory / "dcp").mkdir()
        (directory / "dcp" / "__0_0.distcp").write_bytes(b"shard")

    synced: set[int] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    parts = CheckpointParts(Comm(), torch.device("cpu"), write, lambda d: None, lambda d: True)
    monkeypatch.setattr(os, "fsync", fsync)
    _save(tmp_path, 1, parts)
    step = tmp_path / "step-000001"
    for path in (step / "dcp", step, tmp_path):
        assert path.stat().st_ino in synced, path
