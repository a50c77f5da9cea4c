"""Atomic output folders and files: a failed or interrupted run leaves nothing half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn

from myriad.errors import UserError
from myriad.train.checkpoint import move_into_place

TMP_PREFIX = ".tmp-"


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before any training, an ``out_dir`` that ``write_outputs`` could not write (a
    path below a file) or would replace at a loss: a file, or a folder that is neither empty
    nor a fine-tuning run's (one with ``summary.json``)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / "summary.json").is_file()):
        return
    above = next((p for p in out_dir.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"--out {out_dir}: {above} is a file, not a folder")
    if out_dir.exists() or out_dir.is_symlink():
        raise UserError(
            f"--out {out_dir} exists and is not a myriad finetune folder (it would be replaced); "
            "choose another --out"
        )


def write_outputs(
    out_dir: Path,
    *,
    model: nn.Module,
    config: dict[str, Any],
    summary: dict[str, Any],
    history: list[dict[str, Any]],
    tokenizer_path: Path,
    submission: tuple[str, list[dict[str, Any]] | None],
) -> None:
    """Write a fine-tuning run into a temporary sibling folder, then rename it to ``out_dir``.

    An existing ``out_dir`` is replaced only once the new one is complete.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}-{os.getpid()}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        dump = json.dumps
        (tmp / "config.json").write_text(dump(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "summary.json").write_text(dump(summary, indent=2) + "\n", encoding="utf-8")
        (tmp / "metrics.jsonl").write_text(_jsonl(history), encoding="utf-8")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        name, predictions = submission
        if predictions is not None:
            (tmp / name).write_text(_jsonl(predictions), encoding="utf-8")
        move_into_place(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write {out_dir}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a folder where the file goes, a file where a folder goes
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"could not write {path}: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
