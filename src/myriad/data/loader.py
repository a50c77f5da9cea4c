"""A deterministic, resumable stream of training batches and fixed held-out batches.

Legend: ``B`` batch size, ``S`` sequence length.

Order: epoch ``e`` visits the training sequences in ``randperm`` order seeded from
``(seed, e)``; a batch that runs past the end of an epoch continues with the next epoch's
order, so every batch is full. Targets: the masked-LM corruption of the batch that starts
at ``(epoch, position)`` is seeded from ``(seed, epoch, position)``. The stream's whole
state is therefore ``(epoch, position)``; a stream restored from it yields bit-identical
batches, across epoch boundaries too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from myriad.data.masking import MaskingSpec, causal_labels, mask_tokens
from myriad.errors import UserError

Batch = dict[str, torch.Tensor]
_PERMUTE, _MASK, _HELDOUT = 1, 2, 3  # stream tags, so the derived seeds never collide


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (NumPy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _generator(*parts: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*parts))
    return generator


class TargetMaker:
    """Turns raw rows into ``{"input_ids", "labels"}``; the objective is fixed at construction."""

    def __init__(self, objective: str, spec: MaskingSpec):
        if objective not in ("mlm", "clm"):
            raise UserError(f"model.objective must be 'mlm' or 'clm', got {objective!r}")
        self.objective, self.spec = objective, spec

    def __call__(self, ids_BS: np.ndarray, starts_BS: np.ndarray, seed: int) -> Batch:
        """Build one batch from uint rows; ``seed`` alone decides the masks."""
        input_ids_BS = torch.from_numpy(ids_BS.astype(np.int64))
        if self.objective == "clm":
            inputs_BS, labels_BS = causal_labels(input_ids_BS, self.spec.pad_id)
        else:
            word_starts_BS = torch.from_numpy(starts_BS.astype(np.bool_))
            generator = torch.Generator()
            generator.manual_seed(seed)
            inputs_BS, labels_BS = mask_tokens(input_ids_BS, self.spec, generator, word_starts_BS)
        return {"input_ids": inputs_BS, "labels": labels_BS}


class BatchStream:
    """Endless training batches ``{"input_ids": (B, S) int64, "labels": (B, S) int64}``.

    Args:
        ids_NS: all packed sequences (memory-mapped); only ``indices`` are used.
        starts_NS: their word-start flags.
        indices: the training sequences' row numbers.
        batch_size: sequences per batch.
        seed: decides the order and the masks.
        make_targets: the objective's target maker.
        data_key: identifies the packed data; checked on :meth:`load_state_dict`.
    """

    def __init__(
        self,
        ids_NS: np.ndarray,
        starts_NS: np.ndarray,
        indices: Sequence[int],
        *,
        batch_size: int,
        seed: int,
        make_targets: Callable[[np.ndarray, np.ndarray, int], Batch],
        data_key: str,
    ):
        if batch_size < 1:
            raise UserError(f"train.batch_size must be >= 1, got {batch_size}")
        self._ids, self._starts = ids_NS, starts_NS
        self._indices = np.asarray(indices, dtype=np.int64)
        self.batch_size, self.seed, self.data_key = batch_size, seed, data_key
        self._make_targets = make_targets
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    @property
    def tokens_per_batch(self) -> int:
        """Token positions per batch (``B * S``), padding included."""
        return self.batch_size * int(self._ids.shape[1])

    @property
    def num_sequences(self) -> int:
        """Training sequences per epoch."""
        return len(self._indices)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            perm = torch.randperm(
                self.num_sequences, generator=_generator(self.seed, _PERMUTE, epoch)
            )
            self._order, self._order_epoch = self._indices[perm.numpy()], epoch
        return self._order

    def next_batch(self) -> Batch:
        """The next batch; advances ``(epoch, position)``."""
        mask_seed = derive_seed(self.seed, _MASK, self.epoch, self.position)
        rows: list[np.ndarray] = []
        while sum(len(r) for r in rows) < self.batch_size:
            order = self._epoch_order(self.epoch)
            take = min(self.batch_size - sum(len(r) for r in rows), len(order) - self.position)
            rows.append(order[self.position : self.position + take])
            self.position += take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        rows_B = np.concatenate(rows)
        return self._make_targets(self._ids[rows_B], self._starts[rows_B], mask_seed)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position plus a guard that the data and seed are unchanged."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_sequences": self.num_sequences,
            "data_key": self.data_key,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; refuses a state saved for other data or another seed."""
        self._seek(state, ("seed", self.seed), ("num_sequences", self.num_sequences))

    def follow(self, state: dict[str, Any]) -> None:
        """Move to another rank's saved position (same data and batch size, another seed)."""
        self._seek(state, ("num_sequences", self.num_sequences))

    def _seek(self, state: dict[str, Any], *guards: tuple[str, int]) -> None:
        for key, mine in guards:
            if state.get(key) != mine:
                raise UserError(
                    f"cannot resume the data stream: it was saved with {key}={state.get(key)!r}, "
                    f"this run has {key}={mine!r} (the corpus, tokenizer or seed changed)"
                )
        if "data_key" in state and state["data_key"] != self.data_key:
            raise UserError(
                "cannot resume the data stream: the packed data changed since it was saved "
                f"(cache {state['data_key']} vs {self.data_key}); use the same corpus and tokenizer"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < max(self.num_sequences, 1):
            raise UserError(f"cannot resume the data stream: bad position {epoch}:{position}")
        self.epoch, self.position = epoch, position


def heldout_batches(
    ids_NS: np.ndarray,
    starts_NS: np.ndarray,
    indices: Sequence[int],
    *,
    batch_size: int,
    max_batches: int,
    seed: int,
    make_targets: Callable[[np.ndarray, np.ndarray, int], Batch],
) -> list[Batch]:
    """Fixed evaluation batches: held-out rows in order, masks seeded from (seed, batch index).

    ``max_batches <= 0`` means all of them; the last batch may be smaller than ``batch_size``.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    rows = np.asarray(indices, dtype=np.int64)
    batches = []
    for k, start in enumerate(range(0, len(rows), batch_size)):
        if 0 < max_batches <= k:
            break
        rows_B = rows[start : start + batch_size]
        batch_seed = derive_seed(seed, _HELDOUT, k)
        batches.append(make_targets(ids_NS[rows_B], starts_NS[rows_B], batch_seed))
    return batches
