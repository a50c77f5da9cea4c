"""Resolve ``--task`` to a loaded :class:`Task`: built-in, CLUE 1.1, or a generic JSONL/CSV task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from myriad.errors import UserError
from myriad.eval.builtin import BUILTIN_TASKS
from myriad.eval.formats import CLUE_TASKS, Example, LabelMap, TaskSpec, generic_spec, read_split

GENERIC_TASKS = ("jsonl", "csv")


@dataclass(kw_only=True)
class GenericOptions:
    """Column names of a generic task (``--task jsonl`` or ``--task csv``)."""

    text_field: str = "text"
    text_pair_field: str = ""  # empty: single-sentence classification
    label_field: str = "label"


@dataclass(kw_only=True)
class Task:
    """A task ready to fine-tune on: label map and examples per split."""

    name: str
    labels: LabelMap
    is_pair: bool
    splits: dict[str, list[Example]]  # "train", "dev" and, when present, "test"
    test_labelled: bool = False  # built-in tasks keep test labels; CLUE test files have none
    submission: str = "test_predict.json"
    skipped: dict[str, int] = field(default_factory=dict)  # no-gold-label pairs per split


def task_names() -> list[str]:
    return [*BUILTIN_TASKS, *CLUE_TASKS, *GENERIC_TASKS]


def load_task(
    name: str, data_dir: Path | None = None, generic: GenericOptions | None = None
) -> Task:
    """Load a task; CLUE and generic tasks read train/dev/test files from ``data_dir``."""
    if name in BUILTIN_TASKS:
        build, labels, is_pair = BUILTIN_TASKS[name]
        return Task(
            name=name,
            labels=LabelMap(labels),
            is_pair=is_pair,
            splits=build(),
            test_labelled=True,
            submission=f"{name}_predict.json",
        )
    if name in CLUE_TASKS:
        spec = CLUE_TASKS[name]
    elif name in GENERIC_TASKS:
        opts = generic or GenericOptions()
        spec = generic_spec(
            fmt=name,
            text_a=opts.text_field,
            text_b=opts.text_pair_field,
            label_field=opts.label_field,
        )
    else:
        raise UserError(f"--task {name!r} is unknown; tasks: {', '.join(task_names())}")
    if data_dir is None:
        raise UserError(f"--task {name}: needs --data-dir with {', '.join(spec.files.values())}")
    return _read_task(spec, Path(data_dir))


def _read_task(spec: TaskSpec, data_dir: Path) -> Task:
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: no such folder")
    train_path = data_dir / spec.files["train"]
    labels = LabelMap(spec.labels) if spec.labels else None
    train, skip_train = read_split(train_path, spec, labelled=True, labels=labels)
    if labels is None:  # generic: the label set is what the training file holds, sorted
        found = sorted({ex.label for ex in train if ex.label is not None})
        if len(found) < 2:
            raise UserError(f"{train_path}: needs at least 2 distinct labels, found {found}")
        labels = LabelMap(found)
    dev, skip_dev = read_split(data_dir / spec.files["dev"], spec, labelled=True, labels=labels)
    splits = {"train": train, "dev": dev}
    test_path = data_dir / spec.files["test"]
    if test_path.exists():
        splits["test"] = read_split(test_path, spec, labelled=False)[0]
    return Task(
        name=spec.name,
        labels=labels,
        is_pair=spec.is_pair,
        splits=splits,
        submission=spec.submission,
        skipped={"train": skip_train, "dev": skip_dev},
    )
