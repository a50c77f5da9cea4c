"""Sharded checkpoints: each rank writes its own payloads; export and resharding stream them.

A rank writes ``engine-rank{R}-of-{W}.safetensors`` (its parameter shards and Adam moments, one
entry per chunk) and ``engine-rank{R}-of-{W}.json`` (the layout: which parameter sits where in
which chunk, and which rows of each expert tensor this rank holds), each atomically (temporary
file, fsync, rename, fsync of the directory), so a crash leaves the previous files intact.

Reading goes through :class:`ShardReader`, which assembles one full tensor at a time from the
slices of the rank files that hold it (safetensors reads slices without loading whole files).
So ``myriad export`` writes a consolidated safetensors file parameter by parameter, never
holding the whole model, and ``load_shards`` fills an engine of any world size from a checkpoint
written by another one (resharding).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from myriad.engine.engine import Engine
from myriad.engine.streamfile import write_atomic
from myriad.errors import UserError

KINDS = ("param", "exp_avg", "exp_avg_sq")
_RANK_FILE = re.compile(r"^engine-rank(\d+)-of-(\d+)\.json$")


def _stem(rank: int, world: int) -> str:
    return f"engine-rank{rank:05d}-of-{world:05d}"


def _members(engine: Engine, chunk: Any) -> list[int]:
    """Ranks (of the world) that share ``chunk``, in shard order: every rank for the dense
    chunks, the expert data-parallel group for expert chunks."""
    groups = engine.expert_groups
    if groups is not None and chunk.comm is groups.edp:
        return list(groups.edp_members)
    return list(range(engine.comm.world))


def _layout(engine: Engine) -> dict[str, Any]:
    chunks = []
    for chunk in engine.store.chunks:
        slots = []
        for slot in chunk.slots:
            rows = engine.expert_rows.get(slot.param)
            slots.append(
                {
                    "name": slot.name,
                    "offset": slot.offset,
                    "numel": slot.numel,
                    "shape": list(slot.shape),
                    "rows": list(rows) if rows else None,  # [first row, rows in full tensor]
                }
            )
        chunks.append(
            {
                "index": chunk.index,
                "world": chunk.comm.world,
                "rank": chunk.comm.rank,
                "ranks": _members(engine, chunk),  # the file of each shard, in order
                "capacity": chunk.capacity,
                "slots": slots,
            }
        )
    groups = engine.expert_groups
    return {
        "world": engine.comm.world,
        "rank": engine.comm.rank,
        "expert_parallel_size": groups.size if groups is not None else 0,
        "chunks": chunks,
    }


def save_shards(engine: Engine, directory: Path) -> Path:
    """Write this rank's shards and layout into ``directory``; returns the layout file."""
    engine.synchronize()
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    state = engine.optimizer.state if hasattr(engine, "optimizer") else {}
    for chunk in engine.store.chunks:
        assert chunk.shard_S is not None
        tensors[f"{chunk.index}.param"] = chunk.shard_S.detach().cpu()
        st = state.get(chunk.shard_S, {})
        for kind in ("exp_avg", "exp_avg_sq", "step"):
            if kind in st:
                tensors[f"{chunk.index}.{kind}"] = st[kind].detach().cpu().reshape(-1)
    for name, buf in engine.model.state_dict().items():
        if name not in engine.param_names and torch.is_tensor(buf):  # persistent buffers
            tensors[f"buffer.{name}"] = buf.detach().cpu().clone()
    stem = _stem(engine.comm.rank, engine.comm.world)
    write_atomic(directory / f"{stem}.safetensors", lambda p: save_file(tensors, str(p)))
    layout = json.dumps(_layout(engine), indent=1) + "\n"
    write_atomic(directory / f"{stem}.json", lambda p: p.write_text(layout, encoding="utf-8"))
    return directory / f"{stem}.json"


def _read(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``; a missing or damaged file is a one-line ``UserError`` naming it."""
    if not path.is_file():
        raise UserError(f"engine shard file missing: {path}")
    try:
        return read(path)
    except (OSError, ValueError, SafetensorError) as exc:  # ValueError: bad JSON
        raise UserError(
            f"corrupt or truncated shard files in {path.parent}: {path.name}: {exc}"
        ) from None


class ShardReader:
    """Full tensors by parameter name, assembled from every rank's shard files."""

    def __init__(self, directory: Path) -> None:
        found = sorted(
            (int(m.group(1)), int(m.group(2)), p)
            for p in directory.glob("engine-rank*.json")
            if (m := _RANK_FILE.match(p.name))
        )
        worlds = {w for _, w, _ in found}
        if len(worlds) != 1 or [r for r, _, _ in found] != list(range(next(iter(worlds)))):
            raise UserError(f"{directory}: no complete set of engine shard files")
        self.world = found[0][1]
        self.source = f"{directory} ({self.world} engine shard files)"
        self.layouts = [_read(p, lambda p: json.loads(p.read_text("utf-8"))) for _, _, p in found]
        self.files = [p.with_suffix(".safetensors") for _, _, p in found]
        # name -> [(ranks holding the chunk's shards, chunk layout, slot)] in row order: one
        # piece for a whole tensor, one per expert-parallel rank for split expert tensors (each
        # piece is written by every rank sharing its chunk; the first one seen is kept)
        self.pieces: dict[str, list[tuple[list[int], dict, dict]]] = {}
        found_rows: dict[str, dict[int, tuple[list[int], dict, dict]]] = {}
        for rank, layout in enumerate(self.layouts):
            for chunk in layout["chunks"]:
                ranks = chunk.get("ranks") or (
                    list(range(chunk["world"])) if chunk["world"] > 1 else [rank]
                )
                for slot in chunk["slots"]:
                    first = slot["rows"][0] if slot["rows"] else 0
                    found_rows.setdefault(slot["name"], {}).setdefault(first, (ranks, chunk, slot))
        for name, by_row in found_rows.items():
            self.pieces[name] = [by_row[first] for first in sorted(by_row)]
        self._handles = [_read(f, lambda f: safe_open(str(f), framework="pt")) for f in self.files]

    def names(self) -> list[str]:
        return list(self.pieces)

    def buffers(self) -> dict[str, torch.Tensor]:
        """Persistent buffers (replicated: every rank holds the same), from rank 0's file."""
        h = self._handles[0]
        keys = [k for k in h.keys() if k.startswith("buffer.")]  # noqa: SIM118
        return {k[len("buffer.") :]: h.get_tensor(k) for k in keys}

    def shape(self, name: str) -> list[int]:
        slot = self.pieces[name][0][2]
        shape = list(slot["shape"])
        if slot["rows"]:
            shape[0] = slot["rows"][1]
        return shape

    def _flat(self, ranks: list[int], chunk: dict, slot: dict, kind: str) -> torch.Tensor:
        """One slot's flat values, read from the shards (shard j in ``ranks[j]``'s file) that
        cover its range."""
        shard = chunk["capacity"] // chunk["world"]
        start, end = slot["offset"], slot["offset"] + slot["numel"]
        parts = []
        for r in range(start // shard, (end - 1) // shard + 1):
            lo, hi = max(start, r * shard) - r * shard, min(end, (r + 1) * shard) - r * shard
            parts.append(self._handles[ranks[r]].get_slice(f"{chunk['index']}.{kind}")[lo:hi])
        return torch.cat(parts)

    def full(self, name: str, kind: str = "param") -> torch.Tensor:
        """The whole tensor ``name`` (``kind``: param, exp_avg or exp_avg_sq)."""
        pieces = [
            self._flat(ranks, chunk, slot, kind).view(slot["shape"])
            for ranks, chunk, slot in self.pieces[name]
        ]
        whole = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if list(whole.shape) != self.shape(name):
            raise UserError(f"engine shards: rows of {name} missing (got {list(whole.shape)})")
        return whole

    def shapes(self) -> dict[str, list[int]]:
        """Parameters (tied ones once), then persistent buffers."""
        shapes = {name: self.shape(name) for name in self.names()}
        return shapes | {name: list(buf.shape) for name, buf in self.buffers().items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        """The buffers' dtypes (int64 ids, bool flags among them); the parameters are fp32."""
        return {name: buf.dtype for name, buf in self.buffers().items()}

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor, in the order of :meth:`shapes`: parameters fp32, buffers as stored."""
        params = (self.full(name) for name in self.names())
        return itertools.chain(params, self.buffers().values())

    def step(self) -> float:
        for handle in self._handles:
            for key in handle.keys():  # noqa: SIM118
                if key.endswith(".step"):
                    return float(handle.get_tensor(key)[0])
        return 0.0

    def has_moments(self) -> bool:
        return any(k.endswith(".exp_avg") for k in self._handles[0].keys())  # noqa: SIM118


@torch.no_grad()
def load_shards(engine: Engine, directory: Path, moments: bool = True) -> None:
    """Fill ``engine``'s shards (and, with ``moments``, Adam moments and step) from a checkpoint
    of any world size; each rank reads only the slices it owns."""
    engine.synchronize()
    reader = ShardReader(directory)
    state = engine.optimizer.state if hasattr(engine, "optimizer") else {}
    kinds = KINDS if moments and reader.has_moments() and state else ("param",)
    step = reader.step()
    for name, value in reader.buffers().items():
        engine.model.get_buffer(name).copy_(value)
    for chunk in engine.store.chunks:
        assert chunk.shard_S is not None
        if chunk.params_in_grad:  # the parameters there are about to be the old ones
            engine.store.forget_params(chunk)
        lo, hi = chunk.shard_range()
        targets = {"param": chunk.shard_S.data}
        if "exp_avg" in kinds:
            targets.update({k: state[chunk.shard_S][k] for k in KINDS[1:]})
            state[chunk.shard_S]["step"].fill_(step)
        for slot in chunk.slots:
            start, end = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
            if start >= end:
                continue
            rows = engine.expert_rows.get(slot.param)
            for kind, target in targets.items():
                full = reader.full(slot.name, kind)
                if rows:
                    full = full[rows[0] : rows[0] + slot.shape[0]]
                flat = full.reshape(-1)[start - slot.offset : end - slot.offset]
                target[start - lo : end - lo].copy_(flat)
