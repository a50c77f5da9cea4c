"""Built-in tasks: exact counts, no text in two splits, and eval text kept out of pre-training."""

from __future__ import annotations

from collections import Counter

import pytest

from myriad.data.config import DataConfig
from myriad.data.corpus import open_corpus
from myriad.data.pku import is_eval_reserved, iter_word_lists, zh_news_path
from myriad.eval.builtin import (
    reserved_paragraphs,
    sentences,
    split_80_10_10,
)
from myriad.eval.tasks import load_task


@pytest.fixture(scope="module")
def sentiment():
    return load_task("zh-sentiment")


@pytest.fixture(scope="module")
def nextsent():
    return load_task("zh-nextsent")


def test_sentiment_counts(sentiment):
    labels = Counter(ex.label for split in sentiment.splits.values() for ex in split)
    assert labels == {"positive": 8332, "negative": 9031}
    sizes = {name: len(split) for name, split in sentiment.splits.items()}
    assert sizes == {"train": 13890, "dev": 1736, "test": 1737}
    assert sentiment.labels.labels == ("negative", "positive") and not sentiment.is_pair


def test_sentiment_no_text_in_two_splits(sentiment):
    texts = [ex.text_a for split in sentiment.splits.values() for ex in split]
    assert len(texts) == len(set(texts)) == 17363


def test_sentiment_split_is_fixed(sentiment):
    again = load_task("zh-sentiment")
    assert [ex.text_a for ex in again.splits["dev"]] == [
        ex.text_a for ex in sentiment.splits["dev"]
    ]


def test_split_80_10_10_covers_everything_once():
    parts = split_80_10_10(list(range(1003)), seed=1)
    assert [len(parts[s]) for s in ("train", "dev", "test")] == [802, 100, 101]
    assert sorted(x for p in parts.values() for x in p) == list(range(1003))


def test_nextsent_counts_and_balance(nextsent):
    sizes = {name: len(split) for name, split in nextsent.splits.items()}
    assert sizes == {"train": 3718, "dev": 422, "test": 544}
    for split in nextsent.splits.values():
        counts = Counter(ex.label for ex in split)
        assert counts["next"] == counts["not_next"]
    assert nextsent.is_pair


def test_nextsent_no_sentence_in_two_splits(nextsent):
    seen = {
        name: {t for ex in split for t in (ex.text_a, ex.text_b)}
        for name, split in nextsent.splits.items()
    }
    assert not seen["train"] & seen["dev"]
    assert not seen["train"] & seen["test"]
    assert not seen["dev"] & seen["test"]


def test_nextsent_positives_are_consecutive(nextsent):
    paragraphs = [sents for _, sents in reserved_paragraphs()]
    consecutive = {(a, b) for sents in paragraphs for a, b in zip(sents, sents[1:], strict=False)}
    for ex in nextsent.splits["dev"]:
        assert ((ex.text_a, ex.text_b) in consecutive) == (ex.label == "next")


def test_reserved_lines_never_reach_pretraining():
    path = zh_news_path()
    assert [n for n in range(1, 2101) if is_eval_reserved(n)] == [
        *range(901, 1001),
        *range(1901, 2001),
    ]
    assert len(list(iter_word_lists(path, part="eval"))) == 1900
    assert sum(1 for _ in iter_word_lists(path, part="all")) == 19484


def test_nextsent_text_never_reaches_pretraining(nextsent):
    pretrain_text = "\n".join(open_corpus(DataConfig()).documents())
    for split in nextsent.splits.values():
        for ex in split:
            assert ex.text_a not in pretrain_text and ex.text_b not in pretrain_text


def test_sentence_splitter():
    text = "第一句话在这里。第二句话也在这里！短句。最后一段没有句号但是够长"
    assert sentences(text) == ["第一句话在这里。", "第二句话也在这里！", "最后一段没有句号但是够长"]
