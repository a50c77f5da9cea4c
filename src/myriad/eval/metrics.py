"""Classification metrics, written out so that evaluation needs no scikit-learn at run time.

``tests/test_eval_metrics.py`` checks them against ``sklearn.metrics`` on random labels.
"""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Share of positions where ``pred`` equals ``gold``."""
    if len(gold) != len(pred) or not gold:
        raise ValueError(f"need equal, non-zero lengths, got {len(gold)} and {len(pred)}")
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold)


def macro_f1(gold: Sequence[int], pred: Sequence[int], num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``gold`` or ``pred``.

    Matches ``sklearn.metrics.f1_score(average="macro")`` with its default label set (the
    union of both sequences); a class with no true and no predicted positive never enters, and
    a class with precision + recall = 0 counts as F1 = 0.
    """
    if len(gold) != len(pred) or not gold:
        raise ValueError(f"need equal, non-zero lengths, got {len(gold)} and {len(pred)}")
    tp = [0] * num_classes
    n_gold = [0] * num_classes
    n_pred = [0] * num_classes
    for g, p in zip(gold, pred, strict=True):
        n_gold[g] += 1
        n_pred[p] += 1
        tp[g] += g == p
    scores = []
    for c in range(num_classes):
        if n_gold[c] == 0 and n_pred[c] == 0:
            continue
        scores.append(2 * tp[c] / (n_gold[c] + n_pred[c]))  # = 2PR / (P + R)
    return sum(scores) / len(scores)


def score(gold: Sequence[int], pred: Sequence[int], num_classes: int) -> dict[str, float]:
    """``{"accuracy", "macro_f1"}`` for one split."""
    return {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred, num_classes)}
