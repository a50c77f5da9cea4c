"""Accuracy and macro-F1 against scikit-learn's reference implementations."""

from __future__ import annotations

import random

import pytest
from sklearn.metrics import accuracy_score, f1_score

from myriad.eval.metrics import accuracy, macro_f1, score


@pytest.mark.parametrize("seed", range(6))
def test_against_sklearn_random(seed):
    rng = random.Random(seed)
    classes = rng.choice([2, 3, 15])
    n = rng.randint(1, 300)
    gold = [rng.randrange(classes) for _ in range(n)]
    # a skewed predictor: some classes never predicted, others over-predicted
    pred = [g if rng.random() < 0.6 else rng.randrange(max(1, classes // 2)) for g in gold]
    assert accuracy(gold, pred) == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    ref = f1_score(gold, pred, average="macro", zero_division=0)
    assert macro_f1(gold, pred, classes) == pytest.approx(ref, abs=1e-12)


def test_hand_checked_case():
    gold, pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    # class 0: P 1/2 R 1/2 F 1/2; class 1: P 2/3 R 1 F 4/5; class 2: F 0
    assert macro_f1(gold, pred, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3, abs=1e-12)
    assert score(gold, pred, 3) == {"accuracy": 0.6, "macro_f1": pytest.approx(1.3 / 3)}
    assert f1_score(gold, pred, average="macro") == pytest.approx(1.3 / 3)


def test_absent_class_is_left_out_like_sklearn():
    gold, pred = [0, 0, 1], [0, 1, 1]
    assert macro_f1(gold, pred, 5) == pytest.approx(f1_score(gold, pred, average="macro"))


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        macro_f1([], [], 2)
