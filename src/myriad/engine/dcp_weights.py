"""Whole weights from an ``fsdp2`` checkpoint's ``dcp/`` files, in one process, one at a time.

The trainer's ``fsdp2`` checkpoints are ``torch.distributed.checkpoint`` directories only (every
rank's parameter and optimizer shards under ``model.`` and ``optim.``). Readers that want whole
tensors (``info``, ``finetune``, ``--init-from``, ``myriad export``) load one tensor at a time
with ``no_dist=True``: no process group, and never more than one whole tensor in memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from myriad.errors import UserError

DCP_DIR = "dcp"  # a checkpoint's torch.distributed.checkpoint files (every rank's shards)
_MODEL = "model."


class DcpWeights:
    """The ``model.`` tensors of a checkpoint's ``dcp/`` directory (parameters, tied ones once,
    and persistent buffers), by name."""

    def __init__(self, step_dir: Path) -> None:
        self.path = step_dir / DCP_DIR
        self.source = f"{self.path} (torch.distributed.checkpoint shards)"
        try:
            metadata = dcp.FileSystemReader(str(self.path)).read_metadata()
        except Exception as exc:  # a missing or damaged .metadata file
            raise UserError(f"cannot read the checkpoint files in {self.path}: {exc}") from None
        self._meta = {
            key[len(_MODEL) :]: meta
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith(_MODEL) and isinstance(meta, TensorStorageMetadata)
        }

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(meta.size) for name, meta in self._meta.items()}

    def tensor(self, name: str) -> torch.Tensor:
        meta = self._meta[name]
        holder = {"model": {name: torch.empty(meta.size, dtype=meta.properties.dtype)}}
        try:
            with warnings.catch_warnings():  # "... assuming ... a single process": intended
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(holder, checkpoint_id=str(self.path), no_dist=True)
        except (Exception, CheckpointException) as exc:  # a damaged or missing shard file
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"cannot read {name} from {self.path}: {cause}") from None
        return holder["model"][name]

    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: meta.properties.dtype for name, meta in self._meta.items()}

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor, as stored (fp32 masters; int64 and bool buffers), in the order of
        :meth:`shapes`."""
        return (self.tensor(name) for name in self._meta)
