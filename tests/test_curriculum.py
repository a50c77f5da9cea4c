"""Curriculum: the schedules give the lengths and order they promise; resume stays bit-identical."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from myriad.config import load_recipe
from myriad.data import DataConfig, PreparedData, prepare_data
from myriad.data.config import CurriculumConfig
from myriad.data.curriculum import (
    CurriculumStream,
    competence_at,
    difficulty_scores,
    rank_rows,
    seq_len_at,
    validate,
)
from myriad.errors import UserError
from myriad.train.metrics import read_metrics
from myriad.train.pretrain import run_pretrain

CUR = CurriculumConfig(
    seq_len_start=8, seq_len_steps=6, order="length", order_start=0.25, order_steps=5
)


def test_seq_len_schedule_by_hand():
    # 8 + 24 t / 6 = 8, 12, 16, 20, 24, 28, rounded down to divisors of 32; full from step 6.
    assert [seq_len_at(t, CUR, 32) for t in range(9)] == [8, 8, 16, 16, 16, 16, 32, 32, 32]
    off = CurriculumConfig()
    assert [seq_len_at(t, off, 32) for t in range(3)] == [32, 32, 32]


def test_competence_schedule_by_hand():
    # sqrt(0.25^2 + (1 - 0.25^2) t / 5): t=1 -> sqrt(0.25) = 0.5, t=3 -> sqrt(0.625).
    got = [competence_at(t, CUR) for t in range(7)]
    want = [0.25, 0.5, math.sqrt(0.0625 + 0.9375 * 0.4), math.sqrt(0.625)]
    want += [math.sqrt(0.0625 + 0.9375 * 0.8), 1.0, 1.0]
    assert got == pytest.approx(want, abs=1e-12)
    assert competence_at(0, dataclasses.replace(CUR, order="none")) == 1.0


@pytest.mark.parametrize("block_rows", [1, 2, 1 << 14])
def test_length_and_rarity_scores_by_hand(block_rows: int, monkeypatch):
    monkeypatch.setattr("myriad.data.curriculum._SCORE_BLOCK_ROWS", block_rows)
    pad, cls, sep = 0, 2, 3
    ids_NS = np.array([[cls, 5, sep, 6], [cls, 6, 6, sep], [cls, 7, sep, pad]], dtype=np.uint16)
    # Stream after [CLS]: 5 SEP | 6 6 6 SEP | 7 SEP | PAD -> document lengths 2, 4 and 2 (the
    # SEP counts); the final padding is no document.
    lengths = difficulty_scores(ids_NS, "length", sep, [pad, 1, cls, sep, 4])
    np.testing.assert_allclose(lengths, [(2 + 2 + 4) / 3, 4.0, 2.0])
    # Non-special tokens: 5 and 7 once, 6 three times -> surprisal -log(1/5), -log(3/5).
    rarity = difficulty_scores(ids_NS, "rarity", sep, [pad, 1, cls, sep, 4])
    s1, s6 = -math.log(1 / 5), -math.log(3 / 5)
    np.testing.assert_allclose(rarity, [(s1 + s6) / 2, s6, s1])
    assert list(rank_rows(np.array([3.0, 1.0, 2.0, 1.0]), [0, 1, 2, 3])) == [1, 3, 2, 0]


def test_validate_names_the_key():
    with pytest.raises(UserError, match=r"data.curriculum.seq_len_start .*divisor"):
        validate(dataclasses.replace(CUR, seq_len_start=12), 32)
    with pytest.raises(UserError, match=r"data.curriculum.order "):
        validate(dataclasses.replace(CUR, order="loss"), 32)


class _RowStream:
    """A base stream whose row r is the constant row r: a batch shows which rows it holds."""

    seed, batch_size = 5, 4

    def __init__(self) -> None:
        self.position = 0

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * 32

    def next_batch(self):
        self.position += 1
        return {"input_ids": torch.full((self.batch_size, 32), -self.position)}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_stream_draws_from_the_easiest_share_and_cuts_rows():
    n = 40
    ids_NS = np.repeat(np.arange(n)[:, None], 32, axis=1)
    ranked = np.arange(n)[::-1].copy()  # row 39 is the easiest
    stream = CurriculumStream(
        _RowStream(),
        CUR,
        ids_NS=ids_NS,
        starts_NS=np.ones_like(ids_NS),
        ranked_rows=ranked,
        make_targets=lambda ids, starts, seed: {"input_ids": torch.from_numpy(ids.copy())},
        batches_per_step=2,
    )
    for b in range(16):
        step = b // 2
        batch = stream.next_batch()["input_ids"]
        length = seq_len_at(step, CUR, 32)
        assert batch.shape == (4 * 32 // length, length)
        rows = batch.reshape(4, 32)[:, 0]
        if step < 5:
            pool = set(ranked[: math.ceil(competence_at(step, CUR) * n)].tolist())
            assert set(rows.tolist()) <= pool
        else:  # competence 1: the plain stream, from its start
            assert (rows == -(b - 9)).all()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> PreparedData:
    cfg = DataConfig(max_documents=200, seq_len=32, heldout_fraction=0.05, curriculum=CUR)
    out = tmp_path_factory.mktemp("run")
    return prepare_data(cfg, vocab_size=2000, objective="mlm", out_dir=out, seed=0)


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_real_stream_resume_is_bit_identical(data: PreparedData):
    def stream():
        return data.curriculum_stream(data.train_stream(6, seed=3), batches_per_step=2)

    total = 2 * 8 + data.num_train_sequences // 6 + 2  # past the schedules and an epoch
    reference = stream()
    expected = [reference.next_batch() for _ in range(total)]
    assert expected[0]["input_ids"].shape == (24, 8) and expected[-1]["input_ids"].shape == (6, 32)
    for stop in (1, 7, 10, 11, total - 3):
        first = stream()
        for _ in range(stop):
            first.next_batch()
        resumed = stream()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for k in range(stop, total):
            assert _same(resumed.next_batch(), expected[k]), (stop, k)


def test_real_stream_follow_continues_like_its_own_seed(data: PreparedData):
    """A rank added on resume, mid-schedule: at seed 3's position, seed 4's stream."""

    def stream(seed):
        return data.curriculum_stream(data.train_stream(6, seed=seed), batches_per_step=2)

    other, own, joined = stream(3), stream(4), stream(4)
    for _ in range(7):
        other.next_batch()
        own.next_batch()
    joined.follow(json.loads(json.dumps(other.state_dict())))
    for _ in range(6):
        assert _same(joined.next_batch(), own.next_batch())


def test_length_order_puts_short_documents_first(data: PreparedData):
    scores = difficulty_scores(data._packed.ids_NS, "length", data.special_ids["sep"], [])
    ranked = rank_rows(scores, data.train_rows)
    assert sorted(ranked.tolist()) == sorted(data.train_rows.tolist())
    assert np.all(np.diff(scores[ranked]) >= 0)


def _tiny_recipe(steps: int):
    return load_recipe(
        "tiny-zh-curriculum",
        [
            "model.d_model=32",
            "model.n_heads=2",
            "model.d_ff=64",
            "model.moe.d_expert=32",
            "model.moe.num_experts=4",
            "model.max_seq_len=32",
            "model.vocab_size=2000",
            "data.seq_len=32",
            "data.max_documents=200",
            "data.heldout_fraction=0.05",
            "data.curriculum.seq_len_start=8",
            "data.curriculum.seq_len_steps=4",
            "data.curriculum.order_steps=3",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "train.eval_every=2",
            "train.eval_batches=1",
            "train.checkpoint_every=3",
            "train.device='cpu'",
            f"train.steps={steps}",
        ],
    )


def _losses(path):
    return [(r["step"], r["loss"]) for r in read_metrics(path) if r["kind"] == "train"]


def test_shipped_recipe_trains_and_resumes_bit_identically(tmp_path):
    cfg = _tiny_recipe(6)
    full = run_pretrain(cfg, tmp_path / "full", log=lambda _: None)
    losses = _losses(full.metrics_path)
    assert len(losses) == 6
    # It trains: the held-out loss (one fixed set) falls at every evaluation. The training loss
    # is no measure here: the curriculum changes what a batch holds from step to step.
    heldout = [r["heldout_loss"] for r in read_metrics(full.metrics_path) if r["kind"] == "heldout"]
    assert len(heldout) == 4 and all(b < a for a, b in zip(heldout, heldout[1:], strict=False))
    # A stop after step 3: drop the later checkpoint, resume, and compare steps 4-6 bit for bit.
    shutil.copytree(tmp_path / "full", tmp_path / "stopped")
    shutil.rmtree(tmp_path / "stopped" / "checkpoints" / "step-000006")
    resumed = run_pretrain(cfg, tmp_path / "stopped", resume=True, log=lambda _: None)
    assert _losses(resumed.metrics_path) == losses
