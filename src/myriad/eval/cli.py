"""The bodies of ``myriad finetune`` and ``myriad evaluate`` (``myriad.cli`` stays thin)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from myriad.errors import UserError
from myriad.eval.args import finetune_kwargs, parse_checkpoints


def _threads(args: argparse.Namespace) -> None:
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _task(args: argparse.Namespace):
    from myriad.eval.tasks import GenericOptions, load_task

    generic = GenericOptions(
        text_field=args.text_field,
        text_pair_field=args.text_pair_field,
        label_field=args.label_field,
    )
    data_dir = Path(args.data_dir) if args.data_dir else None
    return load_task(args.task, data_dir, generic)


def finetune_command(args: argparse.Namespace) -> int:
    from myriad.eval.finetune import FinetuneConfig, run_finetune, summary_line

    _threads(args)
    cfg = FinetuneConfig(**finetune_kwargs(args), from_scratch=args.from_scratch)
    cfg.validate()
    task = _task(args)
    out = Path(args.out) if args.out else Path("runs") / f"finetune-{task.name}"
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    result = run_finetune(task, Path(args.checkpoint), out, cfg, tokenizer_path=tokenizer)
    print(f"Done: {summary_line(result)}")
    if "test" in task.splits:
        print(f"  test predictions: {out / task.submission}")
    print(f"Next:\n  {_evaluate_hint(args, out, task.name)}")
    return 0


def _evaluate_hint(args: argparse.Namespace, out: Path, task: str) -> str:
    """The ``myriad evaluate`` command for this fine-tuning run, with the task's data flags."""
    words = ["myriad", "evaluate", "--model", str(out), "--task", task]
    for flag, value in (
        ("--data-dir", args.data_dir),
        ("--text-field", args.text_field),
        ("--text-pair-field", args.text_pair_field),
        ("--label-field", args.label_field),
    ):
        if value:
            words += [flag, value]
    return shlex.join(words)


def evaluate_command(args: argparse.Namespace) -> int:
    _threads(args)
    if args.suite:
        return _suite(args)
    if not args.model or not args.task:
        raise UserError("myriad evaluate needs --suite NAME, or --model FT_DIR --task TASK")
    from myriad.eval.scoring import evaluate_finetuned

    task = _task(args)
    out = Path(args.out) if args.out else None
    result = evaluate_finetuned(Path(args.model), task, out, device=args.device)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _suite(args: argparse.Namespace) -> int:
    from myriad.eval.finetune import FinetuneConfig
    from myriad.eval.suite import SuiteConfig, run_suite

    cfg = SuiteConfig(
        suite=args.suite,
        checkpoints=parse_checkpoints(args.checkpoint),
        seeds=tuple(args.seeds),
        work_dir=args.work_dir,
        report=args.out or "docs/results.md",
        adapt_steps=args.adapt_steps,
    )
    ft = FinetuneConfig(**finetune_kwargs(args))
    ft.validate()
    report = run_suite(cfg, ft)
    print(f"Report: {report}")
    return 0
