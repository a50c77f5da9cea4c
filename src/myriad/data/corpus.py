"""Corpora: lazy, streaming iterators of documents (strings) from a built-in name or user files.

A corpus is described once (which files, their sizes and modification times) so the packed
cache can tell whether its input changed, and read as many times as needed (tokenizer
training, then packing) without ever holding the text in memory.

User files, chosen by ``data.format`` or, with ``"auto"``, by extension:

* ``text`` (``.txt``, ``.text``): UTF-8, one document per non-empty line (lines are
  stripped). One line per document matches the built-in corpus and needs no state across
  lines; join paragraphs onto one line to keep them together.
* ``jsonl`` (``.jsonl``, ``.json``, ``.ndjson``): one JSON object per non-blank line; the
  document is the string in ``data.text_field``.
* ``parquet`` (``.parquet``, ``.pq``): only the ``data.text_field`` column is read, batch by
  batch, never the whole table.

Empty documents are skipped. A corpus that yields nothing at all is a user error.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from myriad.data.config import DataConfig
from myriad.data.pku import ZH_NEWS, iter_word_lists, zh_news_path
from myriad.errors import UserError

FORMATS = ("text", "jsonl", "parquet")
_EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_PARQUET_BATCH_ROWS = 1024
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """A readable corpus: where it is and how to read it; reading is lazy and repeatable.

    Attributes:
        name: ``"zh-news"`` or the user's ``data.corpus`` string, for messages.
        files: ``(path, format)`` for each file, in reading order.
        text_field: field/column holding the text in JSON lines and Parquet.
        max_documents: stop after this many documents; 0 reads everything.
        has_gold_words: whether :meth:`word_lists` yields gold segmentation (zh-news).
    """

    name: str
    files: tuple[tuple[Path, str], ...]
    text_field: str = "text"
    max_documents: int = 0
    has_gold_words: bool = False

    def describe(self) -> dict[str, object]:
        """A JSON-able fingerprint of the input; changes whenever a file changes."""
        files = []
        for path, fmt in self.files:
            stat = path.stat()
            files.append([str(path.resolve()), fmt, stat.st_size, stat.st_mtime_ns])
        return {
            "name": self.name,
            "files": files,
            "text_field": self.text_field,
            "max_documents": self.max_documents,
        }

    def documents(self) -> Iterator[str]:
        """Yield each document's text, streaming; raises UserError if there are none."""
        if self.has_gold_words:
            return ("".join(words) for words in self.word_lists())
        return _checked(self, self._raw_documents())

    def word_lists(self) -> Iterator[list[str]]:
        """Yield each document as its gold words (only for corpora with gold segmentation)."""
        if not self.has_gold_words:
            raise ValueError(f"corpus {self.name!r} has no gold word segmentation")
        raw = (words for path, _ in self.files for words in iter_word_lists(path))
        return _checked(self, raw)

    def _raw_documents(self) -> Iterator[str]:
        for path, fmt in self.files:
            if fmt == "text":
                yield from _read_text(path)
            elif fmt == "jsonl":
                yield from _read_jsonl(path, self.text_field)
            else:
                yield from _read_parquet(path, self.text_field)


def _checked(corpus: Corpus, items: Iterable[_T]) -> Iterator[_T]:
    """Apply ``max_documents`` and turn an empty corpus into a UserError."""
    count = 0
    for item in items:
        count += 1
        yield item
        if count == corpus.max_documents:  # stop before reading (and checking) one more
            break
    if count == 0:
        where = ", ".join(str(p) for p, _ in corpus.files)
        raise UserError(f"data.corpus = {corpus.name!r}: empty corpus, no text in {where}")


def open_corpus(cfg: DataConfig) -> Corpus:
    """Resolve ``cfg.corpus`` to a :class:`Corpus`; every user mistake becomes a UserError."""
    if cfg.max_documents < 0:
        raise UserError(f"data.max_documents must be >= 0, got {cfg.max_documents}")
    if cfg.format != "auto" and cfg.format not in FORMATS:
        raise UserError(
            f"data.format = {cfg.format!r} is unknown; use 'auto', {', '.join(map(repr, FORMATS))}"
        )
    if cfg.corpus == ZH_NEWS:
        return Corpus(
            name=ZH_NEWS,
            files=((zh_news_path(), "pku"),),
            max_documents=cfg.max_documents,
            has_gold_words=True,
        )
    paths = _resolve_paths(cfg.corpus)
    files = tuple((p, _format_of(p, cfg.format)) for p in paths)
    return Corpus(
        name=cfg.corpus, files=files, text_field=cfg.text_field, max_documents=cfg.max_documents
    )


def _resolve_paths(spec: str) -> list[Path]:
    """A file, a directory (its corpus files, recursively, hidden ones left out) or a glob;
    sorted for determinism."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?[") and not path.exists():  # "notes[1].txt" is a file
        pattern = os.path.expanduser(spec)
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"data.corpus = {spec!r}: the glob matches no files")
        return matches
    if path.is_dir():
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in _EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )  # hidden: .ipynb_checkpoints/ would repeat documents
        if not found:
            raise UserError(f"data.corpus = {spec!r}: the folder holds no .txt/.jsonl/.parquet")
        return found
    if not path.is_file():
        raise UserError(
            f"data.corpus = {spec!r}: no such file, folder or built-in corpus "
            f"(built-in: {ZH_NEWS!r})"
        )
    return [path]


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:
        return _EXTENSIONS[path.suffix.lower()]
    except KeyError:
        raise UserError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            f"set data.format to one of {', '.join(FORMATS)}"
        ) from None


def _read_text(path: Path) -> Iterator[str]:
    with path.open("rb") as handle:  # decode per line so an error names the right line
        for lineno, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig").strip()  # -sig: a BOM (Windows editors) is no text
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: not UTF-8 text") from None
            if text:
                yield text


def iter_json_lines(path: Path, handle: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, decoded value)`` per non-blank line; bad JSON is a ``file:line`` error,
    bytes that are not UTF-8 an error naming the file (a text handle decodes ahead of lines)."""
    try:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8-sig") as handle:  # a leading BOM is not JSON
        for lineno, record in iter_json_lines(path, handle):
            if not isinstance(record, dict) or field not in record:
                raise UserError(
                    f"{path}:{lineno}: no field {field!r} in this JSON line (see data.text_field)"
                )
            if text := _stripped(record[field], f"{path}:{lineno}: field {field!r}"):
                yield text


def _stripped(value: Any, where: str) -> str:
    """A record's text, stripped ('' for null, which is skipped); any other type is an error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where} holds {type(value).__name__}, not text")
    return value.strip()


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    if field not in names:
        raise UserError(
            f"{path}: no column {field!r} (see data.text_field); columns: {', '.join(names)}"
        )
    try:  # a damaged page shows only when its rows are read
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field]):
            for value in batch.column(0).to_pylist():
                if text := _stripped(value, f"{path}: column {field!r}"):
                    yield text
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
