"""The classical baseline: character n-gram TF-IDF + logistic regression (scikit-learn).

Single-sentence tasks use one TF-IDF vector per text. Sentence-pair tasks use both texts'
vectors and their element-wise product, which is non-zero exactly on the n-grams the two
texts share: a bag-of-n-grams model can only judge a pair through that overlap.

scikit-learn is the ``eval`` extra (``pip install -e ".[eval]"``); it is imported lazily.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from myriad.errors import UserError
from myriad.eval.metrics import score
from myriad.eval.tasks import Task


@dataclass(kw_only=True)
class TfidfConfig:
    ngram_min: int = 1
    ngram_max: int = 3
    min_df: int = 2
    max_features: int = 200_000
    c: float = 4.0  # inverse L2 strength of the logistic regression
    max_iter: int = 2000


def _sklearn() -> Any:
    try:
        import scipy.sparse as sparse
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise UserError(
            "the TF-IDF baseline needs scikit-learn: pip install 'myriad-moe[eval]'"
        ) from None
    return sparse, TfidfVectorizer, LogisticRegression


def run_tfidf(task: Task, cfg: TfidfConfig, seed: int) -> dict[str, Any]:
    """Fit on train, score dev (and test when labelled); returns metrics and seconds."""
    sparse, vectorizer_cls, lr_cls = _sklearn()
    start = time.perf_counter()

    def vectorizer():
        return vectorizer_cls(
            analyzer="char",
            ngram_range=(cfg.ngram_min, cfg.ngram_max),
            min_df=cfg.min_df,
            max_features=cfg.max_features,
            sublinear_tf=True,
        )

    train = task.splits["train"]
    vec_a = vectorizer().fit([ex.text_a for ex in train])
    vec_b = vectorizer().fit([ex.text_b or "" for ex in train]) if task.is_pair else None

    def features(examples):
        x_a = vec_a.transform([ex.text_a for ex in examples])
        if vec_b is None:
            return x_a
        x_b = vec_b.transform([ex.text_b or "" for ex in examples])
        shared = vec_a.transform([ex.text_b or "" for ex in examples]).multiply(x_a)
        return sparse.hstack([x_a, x_b, shared]).tocsr()

    def gold(examples):
        return [task.labels.to_index(ex.label) for ex in examples]

    model = lr_cls(C=cfg.c, max_iter=cfg.max_iter, random_state=seed)
    model.fit(features(train), gold(train))
    out: dict[str, Any] = {}
    splits = ["dev", "test"] if task.test_labelled and "test" in task.splits else ["dev"]
    for split in splits:
        examples = task.splits[split]
        pred = [int(p) for p in model.predict(features(examples))]
        out[split] = score(gold(examples), pred, len(task.labels))
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out
