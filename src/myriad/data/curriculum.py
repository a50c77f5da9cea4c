"""Curriculum learning: sequence-length warm-up and easy-first data ordering, both resumable.

Legend: ``N`` packed sequences, ``S`` full sequence length, ``s`` scheduled length, ``B`` rows.

Sequence-length warm-up (Li et al. 2022, "The stability-efficiency dilemma"): at step t the
length is ``seq_len_start + (S - seq_len_start) * t / seq_len_steps`` rounded *down* to a
divisor of S, and each (B, S) batch is cut into (B*S/s, s) rows. We keep the tokens per step
(not the sequences per step, as Li et al. do): the optimizer, the learning-rate schedule and a
token-budget comparison then see the same tokens in the same order, only with shorter context;
short steps are cheaper because attention is quadratic in s. Masks are drawn on the full rows
first, so the targets are the same as without the warm-up.

Difficulty ordering (competence-based curriculum, Platanios et al. 2019): every training row
gets a difficulty score; at step t a batch is drawn uniformly (with replacement, seeded by the
batch index) from the easiest ``c(t)`` share of rows, ``c(t) = min(1, sqrt(c0^2 + (1 - c0^2)
t / order_steps))``. Once ``c`` reaches 1 the normal shuffled epochs take over from their start.
Scores: ``length`` is the mean length (tokens) of the documents a row's tokens belong to (rows
of short documents are easy); ``rarity`` is the mean unigram surprisal -log p(token) of its
tokens (rows of common tokens are easy).

The stream's state is the wrapped stream's state plus the number of batches served: with the
schedules pure functions of that count, a resumed run gets bit-identical batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from myriad.data.config import CurriculumConfig
from myriad.data.loader import Batch, BatchStream, derive_seed
from myriad.errors import UserError

ORDERS = ("none", "length", "rarity")
_ORDER_ROWS, _ORDER_MASK = 11, 12  # stream tags, distinct from the loader's
_SCORE_BLOCK_ROWS = 1 << 14  # rows read at a time when scoring (16 k x 128 tokens = 16 MB int64)


def is_enabled(cfg: CurriculumConfig) -> bool:
    """Whether any schedule is on (a disabled curriculum leaves the plain stream untouched)."""
    return (cfg.seq_len_start > 0 and cfg.seq_len_steps > 0) or (
        cfg.order != "none" and cfg.order_steps > 0
    )


def validate(cfg: CurriculumConfig, seq_len: int) -> None:
    """Reject bad schedule values with a message naming the key."""
    key = "data.curriculum"
    checks = [
        (cfg.order in ORDERS, f"{key}.order must be one of {ORDERS}, got {cfg.order!r}"),
        (0 < cfg.order_start <= 1, f"{key}.order_start must be in (0, 1], got {cfg.order_start}"),
        (cfg.order_steps >= 0, f"{key}.order_steps must be >= 0, got {cfg.order_steps}"),
        (cfg.seq_len_steps >= 0, f"{key}.seq_len_steps must be >= 0, got {cfg.seq_len_steps}"),
        (
            cfg.seq_len_start == 0
            or (0 < cfg.seq_len_start <= seq_len and seq_len % cfg.seq_len_start == 0),
            f"{key}.seq_len_start must be 0 or a divisor of data.seq_len ({seq_len}), "
            f"got {cfg.seq_len_start}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def seq_len_at(step: int, cfg: CurriculumConfig, full: int) -> int:
    """The sequence length of optimizer step ``step`` (0-based)."""
    if cfg.seq_len_start <= 0 or cfg.seq_len_steps <= 0 or step >= cfg.seq_len_steps:
        return full
    target = cfg.seq_len_start + (full - cfg.seq_len_start) * step / cfg.seq_len_steps
    return max(d for d in range(cfg.seq_len_start, full + 1) if full % d == 0 and d <= target)


def competence_at(step: int, cfg: CurriculumConfig) -> float:
    """Share of the easiest rows batches are drawn from at ``step``; 1.0 when ordering is off."""
    if cfg.order == "none" or cfg.order_steps <= 0 or step >= cfg.order_steps:
        return 1.0
    c0 = cfg.order_start
    return min(1.0, math.sqrt(c0 * c0 + (1 - c0 * c0) * step / cfg.order_steps))


def difficulty_scores(
    ids_NS: np.ndarray, kind: str, sep_id: int, special_ids: Sequence[int]
) -> np.ndarray:
    """One float per packed row (higher is harder); see the module docstring for the kinds.

    Reads the memory-mapped rows in blocks, so the cache is never held in memory as int64.
    """
    if kind == "length":
        return _length_scores(ids_NS, sep_id)
    if kind == "rarity":
        return _rarity_scores(ids_NS, special_ids)
    raise UserError(f"data.curriculum.order must be one of {ORDERS}, got {kind!r}")


def _blocks(ids_NS: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, int64 block of rows) without column 0 ([CLS], not document text)."""
    for start in range(0, len(ids_NS), _SCORE_BLOCK_ROWS):
        yield start, np.asarray(ids_NS[start : start + _SCORE_BLOCK_ROWS, 1:], dtype=np.int64)


def _length_scores(ids_NS: np.ndarray, sep_id: int) -> np.ndarray:
    # A [SEP] ends its document: a token's document index counts the [SEP]s before it in the
    # stream. Tokens after the last [SEP] are the final row's padding, not a document.
    body = ids_NS.shape[1] - 1
    ends = np.concatenate(
        [np.flatnonzero(block == sep_id) + start * body for start, block in _blocks(ids_NS)]
    )
    scores = np.zeros(len(ids_NS))
    if len(ends) == 0:
        return scores
    doc_len = np.diff(ends, prepend=-1)  # tokens per document, its [SEP] included
    for start, block in _blocks(ids_NS):
        is_sep = block == sep_id
        before = np.searchsorted(ends, start * body)  # documents ended before this block
        doc = before + np.cumsum(is_sep).reshape(block.shape) - is_sep
        inside = doc < len(ends)
        lengths = doc_len[np.minimum(doc, len(ends) - 1)] * inside
        scores[start : start + len(block)] = lengths.sum(1) / np.maximum(inside.sum(1), 1)
    return scores


def _rarity_scores(ids_NS: np.ndarray, special_ids: Sequence[int]) -> np.ndarray:
    # A special such as [MASK] never occurs in the data and may hold the largest id.
    counts = np.zeros(max(special_ids, default=0) + 1)
    for _, block in _blocks(ids_NS):
        found = np.bincount(block.reshape(-1))
        if len(found) > len(counts):
            counts = np.pad(counts, (0, len(found) - len(counts)))
        counts[: len(found)] += found
    counts[list(special_ids)] = 0
    surprisal = -np.log(np.maximum(counts, 1) / max(counts.sum(), 1))
    scores = np.zeros(len(ids_NS))
    for start, block in _blocks(ids_NS):
        plain = ~np.isin(block, list(special_ids))
        total = (surprisal[block] * plain).sum(1)
        scores[start : start + len(block)] = total / np.maximum(plain.sum(1), 1)
    return scores


def rank_rows(scores_N: np.ndarray, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """``rows`` sorted easiest first (ties keep row order, so the ranking is deterministic)."""
    rows_R = np.asarray(rows, dtype=np.int64)
    return rows_R[np.argsort(scores_N[rows_R], kind="stable")]


def cut_rows(batch: Batch, length: int) -> Batch:
    """(B, S) tensors -> (B*S/length, length): the same tokens, shorter rows."""
    return {k: v.reshape(-1, length) for k, v in batch.items()}


class CurriculumStream:
    """A :class:`BatchStream` with the curriculum's ordering and length schedules applied.

    Args:
        base: the plain shuffled stream, used once competence reaches 1.
        cfg: the schedules.
        ids_NS, starts_NS: the packed rows and their word-start flags.
        ranked_rows: training rows, easiest first (from :func:`rank_rows`).
        make_targets: the objective's target maker (same as the base stream's).
        batches_per_step: micro-batches per optimizer step (``train.grad_accum``).
    """

    def __init__(
        self,
        base: BatchStream,
        cfg: CurriculumConfig,
        *,
        ids_NS: np.ndarray,
        starts_NS: np.ndarray,
        ranked_rows: np.ndarray,
        make_targets: Callable[[np.ndarray, np.ndarray, int], Batch],
        batches_per_step: int = 1,
    ):
        self.base, self.cfg = base, cfg
        self._ids, self._starts, self._ranked = ids_NS, starts_NS, ranked_rows
        self._make_targets = make_targets
        self.batches_per_step = max(1, batches_per_step)
        self.full_len = int(ids_NS.shape[1])
        self.batches = 0

    @property
    def tokens_per_batch(self) -> int:
        return self.base.tokens_per_batch

    def next_batch(self) -> Batch:
        """The next batch: easy-first rows while competence < 1, cut to the scheduled length."""
        step = self.batches // self.batches_per_step
        competence = competence_at(step, self.cfg)
        if competence < 1.0:
            pool = max(1, math.ceil(competence * len(self._ranked)))
            generator = torch.Generator().manual_seed(
                derive_seed(self.base.seed, _ORDER_ROWS, self.batches)
            )
            picks = torch.randint(pool, (self.base.batch_size,), generator=generator).numpy()
            rows_B = self._ranked[picks]
            mask_seed = derive_seed(self.base.seed, _ORDER_MASK, self.batches)
            batch = self._make_targets(self._ids[rows_B], self._starts[rows_B], mask_seed)
        else:
            batch = self.base.next_batch()
        self.batches += 1
        return cut_rows(batch, seq_len_at(step, self.cfg, self.full_len))

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "curriculum_batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check(state)
        self.base.load_state_dict(state["base"])
        self.batches = int(state["curriculum_batches"])

    def follow(self, state: dict[str, Any]) -> None:
        self._check(state)
        self.base.follow(state["base"])
        self.batches = int(state["curriculum_batches"])

    @staticmethod
    def _check(state: dict[str, Any]) -> None:
        if "curriculum_batches" not in state:
            raise UserError("cannot resume the data stream: it was saved without a curriculum")
