"""``myriad evaluate --suite``: every system on every built-in task, several seeds, one report.

Systems: the TF-IDF baseline, the first checkpoint's architecture fine-tuned from random
initialisation ("from scratch"), each pre-trained checkpoint fine-tuned, and with
``adapt_steps`` each checkpoint again after task-adaptive pre-training (``adapt.py``), plus its
control: the same steps of masked-LM on the task's texts from random weights (``scratch+tapt``),
which tells how much of a ``+tapt`` lead is the checkpoint's pre-training. Each
neural run writes its usual fine-tuning folder under ``work_dir`` (a finished one with the same
settings is reused, so an interrupted suite resumes); the report is one markdown table of test
accuracy (mean ± sample standard deviation over seeds) per task, with a CLUE-style average
(the unweighted mean over tasks), plus dev accuracy and test macro-F1.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from myriad.errors import UserError
from myriad.eval.adapt import adapt_checkpoint
from myriad.eval.baselines import TfidfConfig, run_tfidf
from myriad.eval.builtin import BUILTIN_TASKS
from myriad.eval.finetune import FinetuneConfig, run_finetune
from myriad.eval.outputs import write_text_atomic
from myriad.eval.tasks import Task, load_task
from myriad.train.checkpoint import resolve_checkpoint

SUITES = {"builtin": tuple(BUILTIN_TASKS)}
SCRATCH_TAPT = "scratch+tapt"  # the control of the +tapt systems


@dataclasses.dataclass(kw_only=True)
class SuiteConfig:
    suite: str = "builtin"
    checkpoints: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> path
    seeds: tuple[int, ...] = (0, 1, 2)
    work_dir: str = "runs/suite"
    report: str = "docs/results.md"
    adapt_steps: int = 0  # > 0: each checkpoint also as NAME+tapt (``adapt.py``)


def _finetune_once(
    task: Task, name: str, ckpt: Path, cfg: FinetuneConfig, work: Path, log: Callable
) -> dict[str, Any]:
    """One fine-tuning run, or the summary of an identical finished one."""
    out = work / f"{task.name}-{name}-seed{cfg.seed}"
    config_path, summary_path = out / "config.json", out / "summary.json"
    if summary_path.is_file() and config_path.is_file():
        old = json.loads(config_path.read_text(encoding="utf-8"))
        old_summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if old.get("finetune") == dataclasses.asdict(cfg) and old_summary["checkpoint"] == str(
            ckpt
        ):
            log(f"  {task.name} {name} seed {cfg.seed}: reusing {out}")
            return old_summary
    result = run_finetune(task, ckpt, out, cfg, progress=False, log=lambda _: None)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    log(
        f"  {task.name} {name} seed {cfg.seed}: dev {result.dev['accuracy']:.4f} "
        f"test {(result.test or {}).get('accuracy', float('nan')):.4f} "
        f"({result.steps} steps, {result.seconds:.0f} s)"
    )
    return summary


def run_suite(cfg: SuiteConfig, ft: FinetuneConfig, *, log: Callable[[str], None] = print) -> Path:
    """Run the suite and write the report; returns the report's path."""
    if cfg.suite not in SUITES:
        raise UserError(f"--suite {cfg.suite!r} is unknown; suites: {', '.join(SUITES)}")
    if not cfg.checkpoints:
        raise UserError("--suite needs at least one --checkpoint NAME=PATH")
    if len(cfg.seeds) < 1:
        raise UserError("--seeds needs at least one seed")
    if cfg.adapt_steps < 0:
        raise UserError(f"--adapt-steps must be >= 0, got {cfg.adapt_steps}")
    for path in cfg.checkpoints.values():  # a typo fails now, not after the first task's runs
        resolve_checkpoint(Path(path))
    first = Path(next(iter(cfg.checkpoints.values())))
    systems: list[tuple[str, Path | None, bool]] = [("tfidf", None, False)]
    systems.append(("scratch", first, True))
    systems += [(name, Path(path), False) for name, path in cfg.checkpoints.items()]
    adapted = {f"{name}+tapt": name for name in cfg.checkpoints} if cfg.adapt_steps else {}
    systems += [(tapt, Path(cfg.checkpoints[name]), False) for tapt, name in adapted.items()]
    if cfg.adapt_steps:
        systems.append((SCRATCH_TAPT, first, False))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    work = Path(cfg.work_dir)
    for task_name in SUITES[cfg.suite]:
        task = load_task(task_name)
        log(f"{task_name}: " + ", ".join(f"{s} {len(e)}" for s, e in task.splits.items()))
        for name, ckpt, scratch in systems:
            rows = results.setdefault(name, {}).setdefault(task_name, [])
            if ckpt is None:  # lbfgs on a convex loss: the seed changes nothing, so run once
                rows.append(_tfidf_once(task, work, log))
                continue
            if name in adapted:
                ckpt = adapt_checkpoint(task, adapted[name], ckpt, cfg.adapt_steps, work, log)
            elif name == SCRATCH_TAPT:
                ckpt = adapt_checkpoint(task, "scratch", ckpt, cfg.adapt_steps, work, log, True)
            for seed in cfg.seeds:
                run_cfg = dataclasses.replace(ft, seed=seed, from_scratch=scratch)
                rows.append(_finetune_once(task, name, ckpt, run_cfg, work, log))
    labels = {name: _describe(name, ckpt, scratch) for name, ckpt, scratch in systems}
    for tapt, name in adapted.items():
        labels[tapt] = (
            f"`{cfg.checkpoints[name]}` after {cfg.adapt_steps} more steps of its pre-training "
            "on each task's training texts, labels unused (task-adaptive pre-training), "
            "fine-tuned"
        )
    if cfg.adapt_steps:
        labels[SCRATCH_TAPT] = (
            f"the control: `{first}`'s architecture from random weights, {cfg.adapt_steps} "
            "steps of the same pre-training on each task's training texts, fine-tuned"
        )
    text = render_report(results, labels, cfg, ft)
    write_text_atomic(Path(cfg.report), text)
    (work / "suite.json").parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(work / "suite.json", json.dumps(results, indent=1) + "\n")
    return Path(cfg.report)


def _tfidf_once(task: Task, work: Path, log: Callable) -> dict[str, Any]:
    """The TF-IDF baseline's scores, or those of an identical finished run."""
    path = work / f"{task.name}-tfidf.json"
    settings = dataclasses.asdict(TfidfConfig())
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("settings") == settings:
            log(f"  {task.name} tfidf: reusing {path}")
            return old
    row = {**run_tfidf(task, TfidfConfig(), 0), "settings": settings}
    write_text_atomic(path, json.dumps(row, indent=1) + "\n")
    log(f"  {task.name} tfidf: test {row['test']['accuracy']:.4f} ({row['seconds']:.0f} s)")
    return row


def _describe(name: str, ckpt: Path | None, scratch: bool) -> str:
    if ckpt is None:
        return (
            "character 1-3-gram TF-IDF + logistic regression (scikit-learn, lbfgs); "
            "deterministic, so run once (± 0)"
        )
    if scratch:
        return f"same architecture as `{ckpt}`, random init"
    return f"`{ckpt}` fine-tuned"


def _cell(values: list[float]) -> str:
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * spread:.2f}"


def _metric(rows: list[dict[str, Any]], split: str, key: str) -> list[float]:
    return [row[split][key] for row in rows]


def render_report(
    results: dict[str, dict[str, list[dict[str, Any]]]],
    labels: dict[str, str],
    cfg: SuiteConfig,
    ft: FinetuneConfig,
) -> str:
    """The markdown report: main table (test accuracy, CLUE-style average), then details."""
    tasks = list(SUITES[cfg.suite])
    head = "| system | " + " | ".join(tasks) + " | average |"
    lines = [
        f"# Results: `myriad evaluate --suite {cfg.suite}`",
        "",
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {_machine()}; seeds "
        f"{', '.join(map(str, cfg.seeds))}. Cells: test accuracy in %, mean ± sample standard "
        "deviation over seeds; average = unweighted mean over tasks (CLUE's score).",
        "",
        head,
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for name, per_task in results.items():
        accs = [_metric(per_task[t], "test", "accuracy") for t in tasks]
        avg = [statistics.mean(seed_accs) for seed_accs in zip(*accs, strict=True)]
        cells = [_cell(a) for a in accs] + [_cell(avg)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    head2 = "| system | " + " | ".join(tasks) + " |"
    lines += [
        "",
        "Dev accuracy / test macro-F1 (%), mean ± sd:",
        "",
        head2,
        "|---|" + "---|" * len(tasks),
    ]
    for name, per_task in results.items():
        cells = [
            f"{_cell(_metric(per_task[t], 'dev', 'accuracy'))} / "
            f"{_cell(_metric(per_task[t], 'test', 'macro_f1'))}"
            for t in tasks
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Systems:", ""]
    lines += [f"- `{name}`: {text}" for name, text in labels.items()]
    settings = ", ".join(
        f"{k}={v}" for k, v in dataclasses.asdict(ft).items() if k not in ("seed", "from_scratch")
    )
    lines += ["", f"Fine-tuning settings: {settings}.", ""]
    return "\n".join(lines)


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu} ({torch.get_num_threads()} threads)"
