"""A deterministic WordPiece vocabulary trainer: the same corpus gives the same vocabulary.

It runs the algorithm of ``tokenizers``' ``WordPieceTrainer`` (BPE merges over words whose
non-initial characters carry the ``##`` prefix) but breaks every tie by the tokens' text.
The Rust trainer breaks ties by ids handed out in hash-map order, and drops alphabet
characters of equal count in that order too, so two processes given the same corpus and seed
trained different vocabularies (on zh-news, 180-250 of 7,402 tokens changed and nearly a third
of the ids moved; huggingface/tokenizers#1794).
Normalisation, pre-tokenisation, encoding and the saved ``tokenizer.json`` stay
``tokenizers``'s own: this module only chooses the vocabulary.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator

Pair = tuple[str, str]


def train_wordpiece(
    word_counts: Counter[str],
    vocab_size: int,
    specials: Iterable[str],
    joins_words: Callable[[str], bool] | None = None,
    prefix: str = "##",
) -> dict[str, int]:
    """Vocabulary of at most ``vocab_size`` tokens, ``specials`` first, as ``{token: id}``.

    The alphabet is the most frequent characters (ties by code point) whose own token and,
    for a character that can stand inside a word, ``##`` piece fit the budget; a word holding
    any other character encodes to ``[UNK]`` and takes no part in merges. Merges then join the
    most frequent adjacent pair, ties by the pair's text, until the vocabulary is full or no
    pair is left.

    Args:
        word_counts: pre-tokenised words and how often each occurs.
        vocab_size: the most tokens the result may hold.
        specials: tokens placed at ids 0, 1, ... in this order.
        joins_words: whether a character can stand inside a word, and so needs a ``##``
            piece even where this corpus never puts it there (a Latin letter, not a CJK
            ideograph); one seen inside a word here gets its piece in any case.
        prefix: marks a piece that continues a word.
    """
    counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for ch in word:
            counts[ch] += count
    joining = {ch for word in word_counts for ch in word[1:]}
    if joins_words is not None:
        joining |= {ch for ch in counts if joins_words(ch)}
    vocab = list(dict.fromkeys(specials))
    alphabet = _alphabet(counts, joining, vocab_size - len(vocab))
    vocab += sorted(alphabet) + sorted(prefix + ch for ch in alphabet & joining)
    words = [
        ([word[0]] + [prefix + ch for ch in word[1:]], count)
        for word, count in sorted(word_counts.items())
        if all(ch in alphabet for ch in word)
    ]
    known = set(vocab)
    merges = _Merges(words)
    while len(vocab) < vocab_size:
        pair = merges.pop_best()
        if pair is None:
            break
        token = pair[0] + pair[1].removeprefix(prefix)
        merges.apply(pair, token)
        if token not in known:  # two pairs can spell the same token
            known.add(token)
            vocab.append(token)
    return {token: i for i, token in enumerate(vocab)}


def _alphabet(counts: Counter[str], joining: set[str], budget: int) -> set[str]:
    """The most frequent characters whose tokens (the character, and its ``##`` piece when it
    is in ``joining``) fit in ``budget``."""
    kept: set[str] = set()
    for ch in sorted(counts, key=lambda c: (-counts[c], c)):
        budget -= 1 + (ch in joining)
        if budget < 0:
            break
        kept.add(ch)
    return kept


class _Merges:
    """Pair counts over the words, kept current as merges rewrite them; a lazy max-heap picks
    the best pair (highest count, then smallest text)."""

    def __init__(self, words: list[tuple[list[str], int]]) -> None:
        self.words = words
        self.count: defaultdict[Pair, int] = defaultdict(int)
        self.where: defaultdict[Pair, set[int]] = defaultdict(set)  # may hold stale words
        for i, (symbols, count) in enumerate(words):
            for pair in _pairs(symbols):
                self.count[pair] += count
                self.where[pair].add(i)
        self.heap = [(-n, pair) for pair, n in self.count.items()]
        heapq.heapify(self.heap)

    def pop_best(self) -> Pair | None:
        while self.heap:
            negative, pair = heapq.heappop(self.heap)
            if -negative == self.count[pair] > 0:  # else a stale entry: its count moved since
                return pair
        return None

    def apply(self, pair: Pair, token: str) -> None:
        """Rewrite every word holding ``pair`` with ``token`` in its place; the pairs whose
        counts changed go back on the heap (the order of the words does not matter: the counts
        only add up)."""
        delta: defaultdict[Pair, int] = defaultdict(int)
        for i in self.where.pop(pair):
            symbols, count = self.words[i]
            merged = _merge(symbols, pair, token)
            if len(merged) == len(symbols):  # no longer holds the pair
                continue
            self.words[i] = (merged, count)
            for p in _pairs(symbols):
                delta[p] -= count
            for p in _pairs(merged):
                delta[p] += count
                self.where[p].add(i)
        for p, change in delta.items():
            if change:
                self.count[p] += change
                if self.count[p] > 0:
                    heapq.heappush(self.heap, (-self.count[p], p))


def _pairs(symbols: list[str]) -> Iterator[Pair]:
    return zip(symbols, symbols[1:], strict=False)


def _merge(symbols: list[str], pair: Pair, token: str) -> list[str]:
    """``symbols`` with each left-to-right occurrence of ``pair`` joined into ``token``."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(token)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out
