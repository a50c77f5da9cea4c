"""Flags of ``myriad finetune`` and ``myriad evaluate``; imports nothing heavy (no torch)."""

from __future__ import annotations

import argparse
from typing import Any


def add_task_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--task",
        required=required,
        help="zh-sentiment, zh-nextsent, a CLUE task (afqmc tnews iflytek ocnli cmnli csl "
        "cluewsc2020) read from --data-dir, or jsonl / csv for your own files",
    )
    parser.add_argument("--data-dir", help="folder with train/dev/test files (CLUE, jsonl, csv)")
    parser.add_argument("--text-field", default="text", help="jsonl/csv: first text column")
    parser.add_argument(
        "--text-pair-field", default="", help="jsonl/csv: second text column (sentence pairs)"
    )
    parser.add_argument("--label-field", default="label", help="jsonl/csv: label column")


def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    """Every :class:`myriad.eval.finetune.FinetuneConfig` field except ``from_scratch``."""
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=128, help="tokens per example")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-steps", type=int, default=0, help="> 0 caps the steps")
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=100, help="dev evaluation every N steps")
    parser.add_argument("--patience", type=int, default=3, help="early stopping, in evaluations")
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0: default")


def finetune_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``FinetuneConfig`` keyword arguments the flags hold."""
    keys = [
        "seed",
        "lr",
        "weight_decay",
        "batch_size",
        "max_len",
        "epochs",
        "max_steps",
        "warmup_ratio",
        "dropout",
        "grad_clip",
        "eval_every",
        "patience",
        "eval_batch_size",
        "device",
    ]
    return {key: getattr(args, key) for key in keys}


def parse_checkpoints(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` pairs, in order; a bare PATH is named after its folder."""
    from pathlib import Path

    from myriad.errors import UserError

    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not name or not path or name in named or name in ("tfidf", "scratch", "scratch+tapt"):
            raise UserError(f"--checkpoint {item!r}: expected a new NAME=PATH")
        named[name] = path
    return named
