"""Train, load and check the WordPiece tokenizer (Hugging Face ``tokenizers``, BERT-Chinese style).

Text is first NFKC-normalised, which folds full-width forms to their ASCII twins (``１９９８`` ->
``1998``, ``，`` -> ``,``): People's Daily writes digits, Latin and much punctuation full-width,
reviews and most web text half-width, and without folding the one's characters are ``[UNK]`` to a
tokenizer trained on the other (3.7 % of zh-sentiment's words under a zh-news vocabulary). Then
``bert-base-chinese``'s normalisation except that case and accents are kept: every CJK ideograph
becomes its own token (``handle_chinese_chars``), other text is split on whitespace and
punctuation, then WordPiece (``##`` continuation pieces). Decoding gives the text back apart from
spaces and the NFKC folding.

The saved ``tokenizer.json`` loads with
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from myriad.data.wordpiece import train_wordpiece
from myriad.errors import UserError

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
_MIN_VOCAB = 64


def bert_style_tokenizer(vocab: dict[str, int] | None = None) -> Tokenizer:
    """A WordPiece tokenizer over ``vocab`` (none yet: untrained) with Myriad's normalisation
    and pre-tokenisation; no post-processor."""
    model = models.WordPiece(
        vocab or {}, unk_token=SPECIAL_TOKENS["unk"], continuing_subword_prefix="##"
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
            ),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


_WORD_SPLITTER = bert_style_tokenizer()


def words_of(text: str) -> list[str]:
    """``text``'s words after the tokenizer's normalisation and pre-tokenisation."""
    normalizer, pre_tokenizer = _WORD_SPLITTER.normalizer, _WORD_SPLITTER.pre_tokenizer
    assert normalizer is not None and pre_tokenizer is not None
    return [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


def count_words(documents: Iterable[str]) -> Counter[str]:
    """How often each word occurs in ``documents`` (see ``words_of``)."""
    counts: Counter[str] = Counter()
    for doc in documents:
        counts.update(words_of(doc))
    return counts


def joins_words(ch: str) -> bool:
    """Whether ``ch`` can stand inside a word: a letter or digit can, a CJK ideograph or a
    punctuation mark cannot (the pre-tokeniser splits them off)."""
    return len(words_of(f"a{ch}a")) == 1


def train_tokenizer(documents: Iterable[str], vocab_size: int, path: Path) -> Tokenizer:
    """Train a WordPiece vocabulary of at most ``vocab_size`` tokens and save it to ``path``.

    The vocabulary comes from ``myriad.data.wordpiece`` (deterministic: the same corpus gives
    the same file); everything else is a ``tokenizers`` WordPiece tokenizer. With a small
    ``vocab_size`` the rarest characters become ``[UNK]``.

    Args:
        documents: the corpus, read once.
        vocab_size: the model's ``vocab_size``; the result has at most this many tokens.
        path: where ``tokenizer.json`` is written (atomically).

    Returns:
        The trained tokenizer, special tokens at ids 0-4 ([PAD], [UNK], [CLS], [SEP], [MASK]).
    """
    if vocab_size < _MIN_VOCAB:
        raise UserError(f"model.vocab_size = {vocab_size} is too small for a tokenizer (>= 64)")
    vocab = train_wordpiece(
        count_words(documents), vocab_size, SPECIAL_TOKENS.values(), joins_words
    )
    tokenizer = bert_style_tokenizer(vocab)
    # Registered as special, as BERT's tokenizer.json does: "[MASK]" in a text is one token,
    # and decoding with skip_special_tokens drops them (their ids stay the vocabulary's).
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
    ids = special_ids(tokenizer)
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", ids["sep"]), ("[CLS]", ids["cls"])
    )
    save_tokenizer(tokenizer, path)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """Write ``tokenizer.json`` atomically (a crash never leaves a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(path)


def load_tokenizer(path: Path, vocab_size: int, *, key: str = "data.tokenizer") -> Tokenizer:
    """Load an existing ``tokenizer.json`` and check it fits the model.

    Raises:
        UserError: the file is missing or unreadable, lacks a special token, or has more
            tokens than the model's embedding table (``vocab_size``).
    """
    if not path.is_file():
        raise UserError(f"{key} = {str(path)!r}: no such file")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"{key} = {str(path)!r}: not a readable tokenizer.json ({exc})") from None
    missing = [tok for tok in SPECIAL_TOKENS.values() if tokenizer.token_to_id(tok) is None]
    if missing:
        raise UserError(f"{key} = {str(path)!r}: missing special tokens {', '.join(missing)}")
    if tokenizer.get_vocab_size() > vocab_size:
        raise UserError(
            f"{key} = {str(path)!r}: {tokenizer.get_vocab_size()} tokens, more than "
            f"model.vocab_size = {vocab_size}"
        )
    top = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if top >= vocab_size:  # ids with gaps: few tokens, yet one beyond the embedding table
        raise UserError(
            f"{key} = {str(path)!r}: token id {top} does not fit model.vocab_size = {vocab_size}"
        )
    return tokenizer


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """``{"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}`` for a trained tokenizer."""
    ids = {name: tokenizer.token_to_id(tok) for name, tok in SPECIAL_TOKENS.items()}
    return {name: int(i) for name, i in ids.items() if i is not None}


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes: identifies a tokenizer in cache keys."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
