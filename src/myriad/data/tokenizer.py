"""Train, load and check the WordPiece tokenizer (Hugging Face ``tokenizers``, BERT-Chinese style).

Normalisation follows ``bert-base-chinese`` except that case and accents are kept: every CJK
ideograph becomes its own token (``handle_chinese_chars``), other text is split on whitespace
and punctuation, then WordPiece (``##`` continuation pieces). Keeping case and accents makes
encode/decode lossless apart from spaces, which matters for a corpus kept in its original
characters (full-width digits and Latin included).

The saved ``tokenizer.json`` loads with
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import WordPieceTrainer

from myriad.errors import UserError

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
_MIN_VOCAB = 64


def _empty_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk"]))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _train_once(documents: Iterator[str], vocab_size: int, limit_alphabet: int) -> Tokenizer:
    tokenizer = _empty_tokenizer()
    trainer = WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        limit_alphabet=limit_alphabet,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def train_tokenizer(
    documents_factory: Callable[[], Iterator[str]], vocab_size: int, path: Path
) -> Tokenizer:
    """Train a WordPiece vocabulary of at most ``vocab_size`` tokens and save it to ``path``.

    The ``tokenizers`` trainer keeps every character of the alphabet even past
    ``vocab_size``, so the alphabet is capped: with a small ``vocab_size`` the rarest
    characters become ``[UNK]`` rather than ids past the model's embedding table. When the
    ``##`` continuation pieces still overshoot, training runs once more with a smaller cap
    (about a second on zh-news), hence a factory rather than one iterator.

    Args:
        documents_factory: returns a fresh stream of the corpus each call.
        vocab_size: the model's ``vocab_size``; the result has at most this many tokens.
        path: where ``tokenizer.json`` is written (atomically).

    Returns:
        The trained tokenizer, special tokens at ids 0-4 ([PAD], [UNK], [CLS], [SEP], [MASK]).
    """
    if vocab_size < _MIN_VOCAB:
        raise UserError(f"model.vocab_size = {vocab_size} is too small for a tokenizer (>= 64)")
    limit = vocab_size - len(SPECIAL_TOKENS)
    tokenizer = _train_once(documents_factory(), vocab_size, limit)
    for _ in range(3):  # "##x" pieces came on top of the alphabet: shrink it and retry
        excess = tokenizer.get_vocab_size() - vocab_size
        if excess <= 0:
            break
        limit = max(limit - 2 * excess, 1)
        tokenizer = _train_once(documents_factory(), vocab_size, limit)
    ids = special_ids(tokenizer)
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", ids["sep"]), ("[CLS]", ids["cls"])
    )
    if tokenizer.get_vocab_size() > vocab_size:  # guards the embedding table
        raise RuntimeError(f"trained {tokenizer.get_vocab_size()} tokens for a {vocab_size} target")
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
    return tokenizer


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """``{"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}`` for a trained tokenizer."""
    ids = {name: tokenizer.token_to_id(tok) for name, tok in SPECIAL_TOKENS.items()}
    return {name: int(i) for name, i in ids.items() if i is not None}


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes: identifies a tokenizer in cache keys."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
