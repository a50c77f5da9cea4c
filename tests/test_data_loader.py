"""Batch streams: determinism, bit-identical resume (across epochs), guard, held-out split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from myriad.data import DataConfig, PreparedData, prepare_data
from myriad.data.curriculum import difficulty_scores
from myriad.data.masking import IGNORE_INDEX
from myriad.errors import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> PreparedData:
    cfg = DataConfig(max_documents=200, seq_len=32, heldout_fraction=0.05)
    out = tmp_path_factory.mktemp("run")
    return prepare_data(cfg, vocab_size=2000, objective="mlm", out_dir=out, seed=0)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels"))


def test_batches_shape_and_targets(data: PreparedData):
    batch = data.train_stream(batch_size=8, seed=0).next_batch()
    assert set(batch) == {"input_ids", "labels"}
    for t in batch.values():
        assert t.shape == (8, 32) and t.dtype == torch.int64
    assert (batch["input_ids"][:, 0] == data.special_ids["cls"]).all()
    assert (batch["labels"] != IGNORE_INDEX).any()
    assert data.train_stream(8, 0).tokens_per_batch == 8 * 32


def test_same_seed_same_batches_other_seed_differs(data: PreparedData):
    a, b, c = (data.train_stream(8, s) for s in (0, 0, 1))
    for _ in range(3):
        x, y, z = a.next_batch(), b.next_batch(), c.next_batch()
        assert _same(x, y) and not _same(x, z)


def test_resume_is_bit_identical_across_epoch_boundary(data: PreparedData):
    n = data.num_train_sequences
    batch_size = 7
    assert n % batch_size  # a batch straddles the epoch boundary
    steps = n // batch_size + 3  # past the boundary
    reference = data.train_stream(batch_size, seed=3)
    expected = [reference.next_batch() for _ in range(steps)]
    assert reference.state_dict()["epoch"] == 1
    for stop in (2, n // batch_size - 1, n // batch_size, n // batch_size + 1):
        first = data.train_stream(batch_size, seed=3)
        for _ in range(stop):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        resumed = data.train_stream(batch_size, seed=3)
        resumed.load_state_dict(state)
        for k in range(stop, steps):
            assert _same(resumed.next_batch(), expected[k]), (stop, k)


def test_follow_takes_another_ranks_position_and_keeps_its_own_seed(data: PreparedData):
    """A rank added on resume: seed 5's stream moved to seed 3's position after 4 batches
    draws what seed 5's own stream draws after 4 batches."""
    other, own = data.train_stream(7, seed=3), data.train_stream(7, seed=5)
    for _ in range(4):
        other.next_batch()
        own.next_batch()
    joined = data.train_stream(7, seed=5)
    joined.follow(other.state_dict())
    assert joined.state_dict() == own.state_dict()
    assert _same(joined.next_batch(), own.next_batch())
    with pytest.raises(UserError, match="num_sequences"):
        joined.follow({**other.state_dict(), "num_sequences": 1})


def test_epochs_visit_every_training_sequence_once(data: PreparedData):
    cfg = DataConfig(max_documents=200, seq_len=32, heldout_fraction=0.05)
    out = data.cache_dir.parents[1]  # same run folder: the cache is shared with the mlm run
    clm = prepare_data(cfg, vocab_size=2000, objective="clm", out_dir=out, seed=0)
    assert clm.cache_dir == data.cache_dir
    ids = np.memmap(clm.cache_dir / "ids.bin", dtype=np.uint16, mode="r").reshape(-1, 32)
    expected = sorted(map(tuple, ids[clm.train_rows].tolist()))
    stream = clm.train_stream(batch_size=clm.num_train_sequences, seed=0)
    first, second = stream.next_batch(), stream.next_batch()
    assert sorted(map(tuple, first["input_ids"].tolist())) == expected
    assert sorted(map(tuple, second["input_ids"].tolist())) == expected
    assert not torch.equal(first["input_ids"], second["input_ids"])  # a new order each epoch
    pad = clm.special_ids["pad"]
    assert torch.equal(
        first["labels"], first["input_ids"].masked_fill(first["input_ids"] == pad, -100)
    )


def test_guard_rejects_changed_data_or_seed(data: PreparedData):
    state = data.train_stream(8, seed=0).state_dict()
    with pytest.raises(UserError, match="seed"):
        data.train_stream(8, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="num_sequences"):
        data.train_stream(8, seed=0).load_state_dict({**state, "num_sequences": 1})
    with pytest.raises(UserError, match="packed data changed"):
        data.train_stream(8, seed=0).load_state_dict({**state, "data_key": "0" * 16})


def test_heldout_fixed_and_disjoint(data: PreparedData):
    total = json.loads((data.cache_dir / "meta.json").read_text())["num_sequences"]
    assert data.num_heldout_sequences == round(0.05 * total)
    assert not set(data.train_rows.tolist()) & set(data.heldout_rows.tolist())
    a = data.heldout_batches(batch_size=4, max_batches=2, seed=0)
    b = data.heldout_batches(batch_size=4, max_batches=2, seed=0)
    assert len(a) == 2 and all(_same(x, y) for x, y in zip(a, b, strict=True))
    every = data.heldout_batches(batch_size=4, max_batches=0, seed=0)
    assert sum(len(x["input_ids"]) for x in every) == data.num_heldout_sequences
    heldout = {row for x in every for row in _originals(x)}
    train = set(_originals(data.train_stream(data.num_train_sequences, seed=0).next_batch()))
    assert len(train) == data.num_train_sequences and not heldout & train


def test_no_document_lies_in_both_splits(data: PreparedData):
    """Number every document in the packed stream; train and held-out rows share none."""
    ids_NS = np.memmap(data.cache_dir / "ids.bin", dtype=np.uint16, mode="r")
    ids_NS = ids_NS.reshape(-1, data.seq_len)
    sep, specials = data.special_ids["sep"], list(data.special_ids.values())
    body = ids_NS[:, 1:]
    document = np.cumsum(body == sep).reshape(body.shape) - (body == sep)  # a [SEP] ends its own
    content = ~np.isin(body, specials)

    def documents(rows: np.ndarray) -> set[int]:
        return set(document[rows][content[rows]].tolist())

    heldout = documents(data.heldout_rows)
    assert heldout and not documents(data.train_rows) & heldout
    sharing = {r for r in range(len(ids_NS)) if documents(np.array([r])) & heldout}
    left_out = set(range(len(ids_NS))) - set(data.train_rows.tolist())
    assert left_out == sharing  # only those rows are kept out of training


def _originals(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """Undo the masking: labels hold the original id wherever the input was changed."""
    chosen = batch["labels"] != IGNORE_INDEX
    return [tuple(r) for r in torch.where(chosen, batch["labels"], batch["input_ids"]).tolist()]


def test_rarity_scores_with_a_special_id_above_every_data_id():
    """[MASK] never occurs in packed rows; a tokenizer may give it the largest id."""
    cls, sep, mask = 2, 3, 99
    ids_NS = np.array([[cls, 5, sep, 6], [cls, 6, 6, 6]], dtype=np.uint16)
    scores = difficulty_scores(ids_NS, "rarity", sep, [0, 1, cls, sep, mask])
    assert scores[0] > scores[1]  # the row with the rare token 5 is harder
