"""Atomic, self-describing checkpoints under ``<run>/checkpoints/step-NNNNNN/``.

A step directory holds ``model.safetensors`` (weights, tied tensors stored once), ``config.json``
(the whole run config, so the checkpoint alone rebuilds the model), ``trainer_state.pt``
(optimizer, scheduler, RNG and data-stream state: what an exact resume needs) and
``trainer_state.json`` (the same bookkeeping for humans).

With ``engine.kind = "myriad"`` or ``"fsdp2"`` the step directory holds every rank's shard files
instead of ``model.safetensors`` (see ``shard_checkpoint.py``); everything here that reads weights
in one process assembles them from the shards, one tensor at a time, when there is no
consolidated file.

Atomicity: everything is written into a hidden temporary directory beside the final one, each file
and the directory are fsynced, the directory is renamed into place, and only then is the ``latest``
pointer replaced (temporary file + ``os.replace``). A crash or a full disk at any point leaves the
previous checkpoint and ``latest`` untouched and no partial ``step-*`` directory; temporary
directories left by a killed process are removed by the next save.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from myriad.engine.streamfile import write_streamed
from myriad.errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SHARD_LAYOUT = re.compile(r"^engine-rank(\d+)-of-(\d+)\.json$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_weights(path: Path, model: nn.Module) -> None:
    """``save_model`` stores a tied tensor once and ``load_model`` re-ties it."""
    save_model(model, str(path), metadata={"format": "pt"})


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_state(path: Path, state: dict[str, Any]) -> None:
    """Through a Python file, so that a failed write (a full disk) keeps its ``OSError``: the
    context of torch's ``RuntimeError`` (writing to a path, torch's C++ writer loses it)."""
    with path.open("wb") as f:
        torch.save(state, f)


def write_failure(exc: Exception) -> Exception | None:
    """The I/O error behind a failed checkpoint write (a full disk, say), else None (a bug, not
    to be relabelled): an ``OSError``, safetensors' own error for one ("I/O error: ..."), or
    ``torch.save``'s ``RuntimeError`` raised while handling one."""
    if isinstance(exc, (OSError, SafetensorError)):
        return exc
    if isinstance(exc, RuntimeError) and isinstance(exc.__context__, OSError):
        return exc.__context__
    return None


def remove_stale_temps(root: Path) -> None:
    """Temporaries of an earlier, killed save: never complete, never pointed to."""
    for entry in root.glob(f"{TMP_PREFIX}*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def save_checkpoint(
    root: Path,
    *,
    step: int,
    model: nn.Module,
    config: dict[str, Any],
    state: dict[str, Any],
    summary: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and point ``latest`` at it.

    Args:
        root: the ``checkpoints`` directory (created if missing).
        config: the run config as a plain dict (``myriad.config.to_dict``).
        state: trainer state for ``torch.save`` (tensors, ints, strings, lists, dicts only).
        summary: the human-readable subset for ``trainer_state.json``.
        keep: keep only the newest ``keep`` step directories; 0 keeps all.

    Raises:
        UserError: the checkpoint could not be written (e.g. disk full); the previous one is intact.
    """
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    writers: list[tuple[str, Callable[[Path], None]]] = [
        (WEIGHTS, lambda p: _write_weights(p, model)),
        (CONFIG, lambda p: write_json(p, config)),
        (STATE, lambda p: _write_state(p, state)),
        (STATE_JSON, lambda p: write_json(p, summary)),
    ]
    try:
        tmp.mkdir()
        for name, write in writers:
            write(tmp / name)
            fsync_file(tmp / name)
        fsync_dir(tmp)
        move_into_place(tmp, final)
        fsync_dir(root)
        write_latest(root, final.name)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (failure := write_failure(exc)) is None:
            raise
        raise UserError(
            f"could not save checkpoint {final}: {failure}; the previous checkpoint is intact"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        prune_checkpoints(root, keep)
    return final


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, replacing an older ``final`` (a step repeated on resume)."""
    if final.exists():
        trash = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_latest(root: Path, name: str) -> None:
    tmp = root / f"{TMP_PREFIX}{LATEST}-{os.getpid()}"
    tmp.write_text(name + "\n", encoding="utf-8")
    fsync_file(tmp)
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete step directories under ``root``, oldest first (temporaries are never listed)."""
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step directories; the one ``latest`` names survives."""
    latest = latest_checkpoint(root)
    for _, path in list_checkpoints(root)[:-keep]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The step directory ``latest`` names, else the newest complete one, else None."""
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text(encoding="utf-8").strip()
        if target.is_dir():
            return target
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_checkpoint(path: Path) -> Path:
    """A step directory from a run directory, a ``checkpoints`` directory or a step directory."""
    path = Path(path)
    # A run's checkpoints first: a run directory may hold an exported model.safetensors too.
    runs = path / "checkpoints"
    if runs.is_dir() and (found := latest_checkpoint(runs)) is not None:
        return found
    if (path / WEIGHTS).exists() or (path / STATE_JSON).exists():
        return path
    if path.is_dir() and (found := latest_checkpoint(path)) is not None:
        return found
    if not path.exists():
        raise UserError(f"checkpoint path not found: {path}")
    raise UserError(f"no checkpoint found in {path} (expected a run, checkpoints or step-* dir)")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"checkpoint file missing: {path}")
    if not os.access(path, os.R_OK):
        raise UserError(f"checkpoint file not readable: {path}")


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint JSON file; missing or malformed is a user error naming the file."""
    _require_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt checkpoint file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"corrupt checkpoint file {path}: expected a JSON object")
    return data


def shard_world(step_dir: Path) -> int | None:
    """The world size that wrote the engine shard files of a sharded checkpoint; None when
    ``step_dir`` holds a consolidated ``model.safetensors`` (or no shard files)."""
    if (step_dir / WEIGHTS).exists():
        return None
    worlds = [
        int(m.group(2))
        for p in step_dir.glob("engine-rank*-of-*.json")
        if (m := _SHARD_LAYOUT.match(p.name))
    ]
    return max(worlds) if worlds else None


def sharded_weights(step_dir: Path) -> Any:
    """A reader of a sharded checkpoint's whole tensors, one at a time (``shapes()`` and
    ``tensors()``): the ``myriad`` engine's shard files or ``fsdp2``'s ``dcp/``; None when
    ``step_dir`` holds a consolidated ``model.safetensors``."""
    from myriad.engine.dcp_weights import DCP_DIR, DcpWeights
    from myriad.engine.shards import ShardReader

    if shard_world(step_dir) is not None:
        make: Callable[[Path], Any] = ShardReader
    elif not (step_dir / WEIGHTS).exists() and (step_dir / DCP_DIR).is_dir():
        make = DcpWeights
    else:
        return None
    return _reading(step_dir, lambda: make(step_dir))


def _reading(step_dir: Path, read: Callable[[], Any]) -> Any:
    """``read()``; a damaged shard or layout file (safetensors or JSON errors) is a user error."""
    try:
        return read()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"corrupt or truncated shard files in {step_dir}: {exc}") from None


def read_shard_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every parameter (whole, tied ones once) and buffer of a sharded checkpoint, assembled
    from all ranks' shard files. Holds the whole model: for single-process consumers."""
    reader = sharded_weights(step_dir)
    if reader is None:
        raise UserError(f"{step_dir} holds no shard files")
    return _all_tensors(step_dir, reader)


def _all_tensors(step_dir: Path, reader: Any) -> dict[str, torch.Tensor]:
    return _reading(step_dir, lambda: dict(zip(reader.shapes(), reader.tensors(), strict=True)))


def export_weights(step_dir: Path, out: Path) -> Path:
    """Consolidate a sharded checkpoint into one safetensors file ``out`` (which must not exist
    yet), one tensor at a time (never the whole model in memory)."""
    reader = sharded_weights(step_dir)
    if reader is None:
        raise UserError(f"{step_dir} holds consolidated weights already: {step_dir / WEIGHTS}")
    if out.exists() or out.is_symlink():  # never replace what is there: a run's own weights?
        raise UserError(f"{out} already exists; remove it or choose another path to export to")
    shapes, dtypes = _reading(step_dir, reader.shapes), _reading(step_dir, reader.dtypes)
    tensors = reader.tensors()
    each = (_reading(step_dir, lambda: next(tensors)) for _ in shapes)  # read errors: the shards
    new_dirs = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # deepest first
    try:
        return write_streamed(out, shapes, each, dtypes)
    except BaseException as exc:  # a failed export leaves no folders made for its file
        _remove_empty(new_dirs)
        if isinstance(exc, OSError):  # the output's: a full disk, a folder it cannot write
            raise UserError(f"cannot write {out}: {exc}") from None
        raise


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        with contextlib.suppress(OSError):  # not empty (something else wrote there) or gone
            d.rmdir()


def _load_shard_weights(model: nn.Module, step_dir: Path, reader: Any) -> None:
    state = _all_tensors(step_dir, reader)
    canonical = {p: n for n, p in model.named_parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied aliases
        if name not in state and canonical[p] in state:
            state[name] = state[canonical[p]]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(f"shard files in {step_dir} do not match the model: {exc}") from None
    if missing or unexpected:
        raise UserError(
            f"shard files in {step_dir} do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_weights(model: nn.Module, step_dir: Path) -> None:
    """Load ``model.safetensors`` into ``model`` (strict); a bad file is a user error naming it.

    A sharded checkpoint (no ``model.safetensors``) is assembled from its shard files.
    """
    path = step_dir / WEIGHTS
    reader = sharded_weights(step_dir)
    if reader is not None:  # opened once: its files' headers and layouts are read here
        _load_shard_weights(model, step_dir, reader)
        return
    _require_file(path)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise UserError(f"corrupt or truncated checkpoint weights {path}: {exc}") from None
    if missing or unexpected:
        raise UserError(
            f"checkpoint weights {path} do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_state(step_dir: Path, name: str = STATE) -> dict[str, Any]:
    """``trainer_state.pt`` (tensors and plain values only: loaded with ``weights_only``);
    ``name``: a sharded checkpoint's per-rank ``trainer_state-rankR.pt``."""
    path = step_dir / name
    _require_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and EOF errors all mean the same to the user
        reason = str(exc) or type(exc).__name__  # an empty file: a bare EOFError
        raise UserError(f"corrupt or truncated trainer state {path}: {reason}") from None
    if not isinstance(state, dict):
        raise UserError(f"corrupt trainer state {path}: expected a dict")
    return state


def weights_summary(step_dir: Path) -> dict[str, Any]:
    """Tensor and parameter counts from the safetensors header; also proves the file is whole.

    Reading the header maps the file and checks that its tensors cover it exactly, so a truncated
    or garbage file fails here without loading any weights.
    """
    path = step_dir / WEIGHTS
    reader = sharded_weights(step_dir)
    if reader is not None:
        source, shapes = reader.source, list(_reading(step_dir, reader.shapes).values())
    else:
        _require_file(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = [f.get_slice(name).get_shape() for name in f.keys()]  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise UserError(f"corrupt or truncated checkpoint weights {path}: {exc}") from None
        source = str(path)
    return {"file": source, "tensors": len(shapes), "parameters": sum(map(math.prod, shapes))}


def read_checkpoint_info(path: Path | str) -> dict[str, Any]:
    """Config and training state of a checkpoint, for ``myriad info``; loads no tensors.

    Args:
        path: a run directory (its latest checkpoint), a ``checkpoints`` directory, a step
            directory, or a file inside one (e.g. ``model.safetensors``).

    Returns:
        ``{"path", "step", "config", "state", "weights"}``: ``config`` is the whole run config as
        a dict, ``state`` the content of ``trainer_state.json`` (step, tokens_seen, losses,
        elapsed_s, lr, saved_at), ``weights`` the tensor and parameter counts of the weights file.

    Raises:
        UserError: no checkpoint there, or a missing, unreadable or corrupt file (named).
    """
    path = Path(path)
    step_dir = resolve_checkpoint(path.parent if path.is_file() else path)
    config = read_json(step_dir / CONFIG)
    state = read_json(step_dir / STATE_JSON)
    weights = weights_summary(step_dir)
    return {
        "path": str(step_dir),
        "step": state.get("step"),
        "config": config,
        "state": state,
        "weights": weights,
    }


def load_model_from_checkpoint(path: Path | str, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint describes and load its weights.

    Returns:
        ``(model, run_config)``: an ``MoETransformerLM`` in eval mode on ``device`` and the
        ``RunConfig`` it was trained with.
    """
    from myriad.config import RunConfig, from_dict
    from myriad.model import MoETransformerLM

    path = Path(path)
    step_dir = resolve_checkpoint(path.parent if path.is_file() else path)
    cfg = from_dict(RunConfig, read_json(step_dir / CONFIG), where=str(step_dir / CONFIG))
    model = MoETransformerLM(cfg.model)
    load_weights(model, step_dir)
    return model.to(device).eval(), cfg
