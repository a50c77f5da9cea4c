"""Task formats: the CLUE 1.1 classification tasks as distributed, and generic JSONL/CSV tasks.

Every task reads into the same :class:`Example` (id, first text, optional second text, label
string). A :class:`TaskSpec` names the fields, the label set and the submission file; a
:class:`LabelMap` turns label strings into class indices and back. Every mistake in a data file
is a ``UserError`` naming the file and the 1-based line.

CLUE ships ``train.json``, ``dev.json`` and ``test.json`` per task, each JSON lines (OCNLI's
training file is ``train.50k.json``, the 50k set its submission name refers to). Test files
carry ``id`` and no label; CLUEWSC2020 train/dev use ``idx``. OCNLI and CMNLI mark pairs whose
annotators disagreed with the label ``"-"``: those have no gold label and are skipped, as CLUE's
own baselines do (the count is reported).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from myriad.data.corpus import iter_json_lines
from myriad.errors import UserError

NO_GOLD = "-"  # OCNLI / CMNLI: annotators did not agree; no gold label


@dataclass(frozen=True, kw_only=True)
class Example:
    """One classification example; ``label`` is None for test files."""

    id: str | int
    text_a: str
    text_b: str | None = None
    label: str | None = None


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """How to read one task.

    Attributes:
        name: the task name given to ``--task``.
        text_a / text_b: field (column) of the first / second text; ``text_b`` empty for
            single-sentence tasks.
        label_field: field of the label.
        labels: the label set in a fixed order (class index = position); empty for a generic
            task, whose set is read from its training file.
        submission: file name of the test predictions (CLUE's name for CLUE tasks).
        files: split -> file name inside the data directory.
        reader: ``"jsonl"`` or ``"csv"``.
        custom: a parser for tasks whose text is built from several fields (CSL, CLUEWSC2020).
    """

    name: str
    text_a: str
    text_b: str = ""
    label_field: str = "label"
    labels: tuple[str, ...] = ()
    submission: str = ""
    files: dict[str, str] = field(
        default_factory=lambda: {"train": "train.json", "dev": "dev.json", "test": "test.json"}
    )
    reader: str = "jsonl"
    custom: Callable[[dict[str, Any], str], tuple[str, str | None]] | None = None

    @property
    def is_pair(self) -> bool:
        return bool(self.text_b) or self.custom is not None  # CSL and CLUEWSC build pairs


class LabelMap:
    """Label strings <-> class indices, in the task's fixed order."""

    def __init__(self, labels: tuple[str, ...] | list[str]) -> None:
        if len(labels) < 2:
            raise UserError(f"a classification task needs at least 2 labels, got {list(labels)}")
        self.labels = tuple(labels)
        self._index = {label: i for i, label in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return label in self._index

    def to_index(self, label: str) -> int:
        return self._index[label]

    def to_label(self, index: int) -> str:
        return self.labels[index]


def _csl_text(record: dict[str, Any], where: str) -> tuple[str, str | None]:
    """CSL: the abstract, and its keywords joined with a space (as CLUE's baseline does)."""
    abst, keywords = _require(record, "abst", where), _require(record, "keyword", where)
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        raise UserError(f"{where}: field 'keyword' must be a list of strings")
    return _as_text(abst, "abst", where), " ".join(keywords)


def _wsc_text(record: dict[str, Any], where: str) -> tuple[str, str | None]:
    """CLUEWSC2020: the text with the two spans marked in place, and "pronoun -> noun"."""
    text = _as_text(_require(record, "text", where), "text", where)
    target = _require(record, "target", where)
    if not isinstance(target, dict):
        raise UserError(f"{where}: field 'target' must be an object")
    spans = []
    for n, (left, right) in ((1, ("[", "]")), (2, ("<", ">"))):
        index, span = target.get(f"span{n}_index"), target.get(f"span{n}_text")
        if not isinstance(index, int) or not isinstance(span, str):
            raise UserError(f"{where}: target.span{n}_index / span{n}_text missing or mistyped")
        if text[index : index + len(span)] != span:
            raise UserError(f"{where}: target.span{n}_text {span!r} is not at index {index}")
        spans.append((index, span, left, right))
    for index, span, left, right in sorted(spans, reverse=True):  # later span first
        text = text[:index] + left + span + right + text[index + len(span) :]
    return text, f"{target['span2_text']}->{target['span1_text']}"


TNEWS_LABELS = tuple(str(i) for i in range(100, 117) if i not in (105, 111))
NLI_LABELS = ("entailment", "neutral", "contradiction")

CLUE_TASKS: dict[str, TaskSpec] = {
    "afqmc": TaskSpec(
        name="afqmc",
        text_a="sentence1",
        text_b="sentence2",
        labels=("0", "1"),
        submission="afqmc_predict.json",
    ),
    "tnews": TaskSpec(
        name="tnews", text_a="sentence", labels=TNEWS_LABELS, submission="tnews11_predict.json"
    ),
    "iflytek": TaskSpec(
        name="iflytek",
        text_a="sentence",
        labels=tuple(str(i) for i in range(119)),
        submission="iflytek_predict.json",
    ),
    "ocnli": TaskSpec(
        name="ocnli",
        text_a="sentence1",
        text_b="sentence2",
        labels=NLI_LABELS,
        submission="ocnli_50k_predict.json",
        files={"train": "train.50k.json", "dev": "dev.json", "test": "test.json"},
    ),
    "cmnli": TaskSpec(
        name="cmnli",
        text_a="sentence1",
        text_b="sentence2",
        labels=NLI_LABELS,
        submission="cmnli_predict.json",
    ),
    "csl": TaskSpec(
        name="csl",
        text_a="abst",
        labels=("0", "1"),
        submission="csl_predict.json",
        custom=_csl_text,
    ),
    "cluewsc2020": TaskSpec(
        name="cluewsc2020",
        text_a="text",
        labels=("true", "false"),
        submission="cluewsc11_predict.json",
        custom=_wsc_text,
    ),
}


def generic_spec(
    *, fmt: str, text_a: str, text_b: str = "", label_field: str = "label"
) -> TaskSpec:
    """A user task: ``train``/``dev``/``test`` files in JSON lines or CSV with named columns."""
    if fmt not in ("jsonl", "csv"):
        raise UserError(f"--task must be 'jsonl' or 'csv' for a generic task, got {fmt!r}")
    ext = "jsonl" if fmt == "jsonl" else "csv"
    files = {split: f"{split}.{ext}" for split in ("train", "dev", "test")}
    return TaskSpec(
        name=fmt,
        text_a=text_a,
        text_b=text_b,
        label_field=label_field,
        submission="test_predict.json",
        files=files,
        reader=fmt,
    )


def _require(record: dict[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise UserError(f"{where}: missing field {key!r}")
    return record[key]


def _as_text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} holds {type(value).__name__}, not text")
    return value


def _records(path: Path, reader: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-blank line (JSONL) or data row (CSV)."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open(encoding="utf-8-sig", newline="") as handle:  # Excel writes CSV with a BOM
        if reader == "csv":
            table = csv.DictReader(handle)
            try:
                for row in table:
                    rows.append((table.line_num, dict(row)))
            except UnicodeDecodeError:
                raise UserError(f"{path}: not UTF-8 text") from None
        else:
            for lineno, record in iter_json_lines(path, handle):
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object")
                rows.append((lineno, record))
    if not rows:
        raise UserError(f"{path}: empty file, no examples")
    return rows


def _label_of(record: dict[str, Any], spec: TaskSpec, where: str) -> str:
    value = _require(record, spec.label_field, where)
    if isinstance(value, bool):  # a JSON true/false label (CLUEWSC writes strings, users may not)
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return _as_text(value, spec.label_field, where)


def read_split(
    path: Path, spec: TaskSpec, *, labelled: bool, labels: LabelMap | None = None
) -> tuple[list[Example], int]:
    """Read one split file.

    Args:
        labelled: train/dev (a label is required) or test (labels, if present, are ignored).
        labels: the label set a label must belong to; None accepts any (a generic train file).

    Returns:
        ``(examples, skipped)``: ``skipped`` counts OCNLI/CMNLI pairs without a gold label.
    """
    examples: list[Example] = []
    skipped = 0
    for lineno, record in _records(path, spec.reader):
        where = f"{path}:{lineno}"
        if spec.custom is not None:
            text_a, text_b = spec.custom(record, where)
        else:
            text_a = _as_text(_require(record, spec.text_a, where), spec.text_a, where)
            text_b = None
            if spec.text_b:
                text_b = _as_text(_require(record, spec.text_b, where), spec.text_b, where)
        label = None
        if labelled:
            label = _label_of(record, spec, where)
            if label == NO_GOLD and spec.labels == NLI_LABELS:
                skipped += 1
                continue
            if labels is not None and label not in labels:
                raise UserError(
                    f"{where}: label {label!r} is not one of the task's labels "
                    f"({', '.join(labels.labels[:20])}{', ...' if len(labels) > 20 else ''})"
                )
        ident = record.get("id", record.get("idx", len(examples)))
        if not isinstance(ident, (int, str)):
            ident = str(ident)
        examples.append(Example(id=ident, text_a=text_a, text_b=text_b, label=label))
    return examples, skipped
