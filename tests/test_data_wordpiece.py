"""The deterministic WordPiece trainer: hand-worked merges, agreement with ``tokenizers``' own
trainer where no tie arises, tie-breaking by text, and the same file from any process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.trainers import WordPieceTrainer

from myriad.data.tokenizer import load_tokenizer, train_tokenizer
from myriad.data.wordpiece import train_wordpiece

# Pairs: (a,##b) = 5+3+2 = 10 > (##b,##c) = 8 > (##c,##d) = 6 > (b,##c) = 1, so the first three
# merges are ab, abc, abcd, each the unique best; the fourth is a tie (see below).
WORDS = Counter({"abcd": 5, "abc": 3, "bcd": 1, "ab": 2})
ALPHABET = ["a", "b", "c", "d", "##b", "##c", "##d"]


def test_merges_worked_by_hand():
    vocab = train_wordpiece(WORDS, 100, ["[UNK]"])
    # After abcd, "bcd" = b ##c ##d has two pairs of count 1: ("##c", "##d") < ("b", "##c")
    # by text, so ##cd comes first, then bcd.
    assert list(vocab) == ["[UNK]", *ALPHABET, "ab", "abc", "abcd", "##cd", "bcd"]
    assert list(vocab.values()) == list(range(len(vocab)))


def test_agrees_with_tokenizers_trainer_without_ties():
    size = 1 + len(ALPHABET) + 3  # stop before the tie
    ours = train_wordpiece(WORDS, size, ["[UNK]"])
    reference = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    reference.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = WordPieceTrainer(vocab_size=size, special_tokens=["[UNK]"], show_progress=False)
    reference.train_from_iterator([" ".join(WORDS.elements())], trainer=trainer)
    assert set(ours) == set(reference.get_vocab()) and len(ours) == size


def test_alphabet_keeps_the_most_frequent_characters_ties_by_code_point():
    words = Counter({"丙": 3, "甲": 2, "乙": 2})  # 乙 (U+4E59) sorts before 甲 (U+7532)
    assert list(train_wordpiece(words, 3, ["[UNK]"])) == ["[UNK]", "丙", "乙"]
    # A character's "##" piece counts against the budget too: y needs y and ##y.
    assert list(train_wordpiece(Counter({"xy": 1}), 3, ["[UNK]"])) == ["[UNK]", "x"]
    expected = ["[UNK]", "x", "y", "##y", "xy"]
    assert list(train_wordpiece(Counter({"xy": 1}), 5, ["[UNK]"])) == expected
    # Told that every character joins words, x gets its piece though no word here continues
    # with it.
    every = train_wordpiece(Counter({"xy": 1}), 10, ["[UNK]"], joins_words=lambda ch: True)
    assert list(every) == ["[UNK]", "x", "y", "##x", "##y", "xy"]


def test_rare_characters_become_unk(tmp_path: Path):
    common = "".join(chr(0x4E00 + i) * 2 for i in range(59))  # fills 64 - 5 special tokens
    tokenizer = train_tokenizer([common + "龍"], 64, tmp_path / "t.json")
    assert tokenizer.get_vocab_size() == 64
    assert tokenizer.encode("一龍", add_special_tokens=False).tokens == ["一", "[UNK]"]


_TRAIN = """
import sys
from pathlib import Path
from myriad.data.config import DataConfig
from myriad.data.corpus import open_corpus
from myriad.data.tokenizer import train_tokenizer
train_tokenizer(open_corpus(DataConfig(max_documents=3000)).documents(), 3000, Path(sys.argv[1]))
"""


def test_same_file_from_any_process(tmp_path: Path):
    """Different hash seeds change every set's and dict's iteration order in Python (the Rust
    trainer's hash maps are seeded per process the same way): the file must not change."""
    paths = [tmp_path / f"seed{seed}.json" for seed in (1, 2)]
    for seed, path in zip((1, 2), paths, strict=True):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        subprocess.run([sys.executable, "-c", _TRAIN, str(path)], env=env, check=True)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert load_tokenizer(paths[0], 3000).get_vocab_size() == 3000
