"""Tokenizer training time: Myriad's deterministic WordPiece trainer vs ``tokenizers``' own.

Two corpora: zh-news (the built-in default, vocabulary 8,000) and Latin-heavy text, the Python
sources of the installed ``torch`` package (vocabulary 32,000, many merges). Both trainers see
the same normalisation and pre-tokenisation; ``tokenizers``' trainer is multi-threaded Rust and
not deterministic across processes, Myriad's is Python and deterministic.

Usage: python benchmarks/tokenizer.py [--chars 20000000]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from tokenizers.trainers import WordPieceTrainer

from myriad.data.config import DataConfig
from myriad.data.corpus import open_corpus
from myriad.data.tokenizer import SPECIAL_TOKENS, bert_style_tokenizer, count_words, joins_words
from myriad.data.wordpiece import train_wordpiece


def torch_sources(limit: int) -> list[str]:
    """Python files of the installed torch package, in path order, up to ``limit`` chars."""
    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    docs, size = [], 0
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        size += len(text)
        if size >= limit:
            break
    return docs


def train_times(docs: list[str], size: int) -> tuple[float, float]:
    """Seconds to train a ``size``-token vocabulary on ``docs``: Myriad's, then tokenizers'."""
    specials = list(SPECIAL_TOKENS.values())
    start = time.perf_counter()
    train_wordpiece(count_words(docs), size, specials, joins_words)
    middle = time.perf_counter()
    trainer = WordPieceTrainer(vocab_size=size, special_tokens=specials, show_progress=False)
    bert_style_tokenizer().train_from_iterator(docs, trainer=trainer)
    return middle - start, time.perf_counter() - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=20_000_000, help="Latin corpus size")
    args = parser.parse_args()
    corpora = {
        "zh-news": (list(open_corpus(DataConfig()).documents()), 8000),
        "torch sources": (torch_sources(args.chars), 32000),
    }
    print("| corpus | chars | vocabulary | Myriad | tokenizers | Myriad / tokenizers |")
    print("|---|---|---|---|---|---|")
    for name, (docs, size) in corpora.items():
        ours, theirs = train_times(docs, size)
        chars = sum(map(len, docs))
        print(
            f"| {name} | {chars / 1e6:.1f} M | {size:,} | {ours:.1f} s | {theirs:.1f} s "
            f"| {ours / theirs:.1f}x |"
        )


if __name__ == "__main__":
    main()
