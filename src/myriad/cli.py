"""The ``myriad`` command: parses arguments and calls one function per sub-command.

User mistakes (``UserError``) print one line on stderr and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from myriad.errors import UserError


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe", help="shipped recipe name or a .toml path (default: tiny-zh, or the run's own)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one recipe value, e.g. --set train.steps=100 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="myriad", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    pretrain = sub.add_parser("pretrain", help="pre-train an MoE language model from a recipe")
    _add_recipe_args(pretrain)
    pretrain.add_argument("--data", help="corpus path or glob (.txt, .jsonl, .parquet)")
    pretrain.add_argument("--out", help="run directory (default: runs/RECIPE)")
    pretrain.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    pretrain.add_argument(
        "--init-from",
        metavar="CKPT",
        help="hot-start from a trained run/checkpoint: load, upcycle dense->MoE, or grow",
    )
    pretrain.set_defaults(func=cmd_pretrain)

    info = sub.add_parser("info", help="describe a recipe or a checkpoint")
    info.add_argument("target", help="recipe name, .toml path, run directory or checkpoint")
    info.add_argument("--set", dest="overrides", action="append", default=[])
    info.set_defaults(func=cmd_info)

    plan = sub.add_parser("plan", help="per-GPU memory, step time and smallest cluster of a recipe")
    _add_recipe_args(plan)
    plan.add_argument("--cluster", required=True, help="shipped cluster spec name or a .toml path")
    plan.set_defaults(func=cmd_plan)

    from myriad.eval.args import add_finetune_args, add_task_args

    finetune = sub.add_parser("finetune", help="fine-tune a checkpoint on a classification task")
    finetune.add_argument("--checkpoint", required=True, help="run dir, checkpoints or step dir")
    add_task_args(finetune)
    finetune.add_argument("--out", help="output folder (default: runs/finetune-TASK)")
    finetune.add_argument("--from-scratch", action="store_true", help="random init baseline")
    add_finetune_args(finetune)
    finetune.set_defaults(func=cmd_finetune)

    evaluate = sub.add_parser("evaluate", help="score a fine-tuned model, or run a task suite")
    evaluate.add_argument("--suite", help="run every system on a suite of tasks: builtin")
    evaluate.add_argument("--model", help="a folder written by myriad finetune, to score")
    evaluate.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH")
    evaluate.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    evaluate.add_argument("--work-dir", default="runs/suite", help="suite: fine-tuning runs")
    evaluate.add_argument(
        "--adapt-steps",
        type=int,
        default=0,
        help="suite: also each checkpoint after N steps of pre-training on the task's "
        "training texts (NAME+tapt)",
    )
    evaluate.add_argument("--out", help="suite: report (docs/results.md); else predictions file")
    add_task_args(evaluate, required=False)
    add_finetune_args(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)
    export = sub.add_parser(
        "export", help="consolidate a sharded checkpoint (myriad or fsdp2) into one safetensors"
    )
    export.add_argument(
        "shards", help="a step directory with shard files, or a run whose latest step has them"
    )
    export.add_argument("--out", required=True, help="the safetensors file to write")
    export.set_defaults(func=cmd_export)
    return parser


def cmd_pretrain(args: argparse.Namespace) -> int:
    from myriad.config import DEFAULT_RECIPE, build_config, load_recipe, to_dict
    from myriad.engine import runtime as engine_runtime
    from myriad.train.pretrain import load_run_config, run_pretrain

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.corpus={_toml_string(args.data)}")
    if args.init_from:
        overrides.append(f"train.init_from={_toml_string(args.init_from)}")
    recipe = args.recipe or DEFAULT_RECIPE
    out_dir = Path(args.out) if args.out else Path("runs") / Path(recipe).stem
    if args.resume and args.recipe is None and (out_dir / "config.json").is_file():
        # Resuming continues the run's own config; --set may still change e.g. train.steps.
        cfg = build_config(to_dict(load_run_config(out_dir)), overrides, str(out_dir))
    else:
        cfg = load_recipe(recipe, overrides)
    result = run_pretrain(cfg, out_dir, resume=args.resume)
    engine_runtime.leave()
    print(
        "\nDone.\n"
        f"  checkpoint : {result.checkpoint}\n"
        f"  tokenizer  : {result.tokenizer_path}\n"
        f"  metrics    : {result.metrics_path}\n"
        f"  plots      : {', '.join(str(p) for p in result.plot_paths)}\n"
        f"  held-out loss {result.first_heldout_loss:.3f} -> {result.final_heldout_loss:.3f}\n"
        "Next:\n"
        f"  myriad info {result.checkpoint}\n"
        f"  tensorboard --logdir {out_dir}\n"
        f"  myriad pretrain --out {out_dir} --resume --set train.steps=N   (train on to step N)"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from myriad.config import load_recipe, to_dict
    from myriad.info import describe

    target = Path(args.target)
    if target.is_dir() or target.suffix == ".safetensors":
        from myriad.train.checkpoint import read_checkpoint_info

        if args.overrides:  # a checkpoint's config is what it was trained with
            raise UserError(f"--set applies to recipes, not to the checkpoint {target}")

        print(describe(read_checkpoint_info(target)))
        return 0
    if "/" in args.target and not target.exists():  # a path, not a recipe name
        raise UserError(f"no such checkpoint or recipe file: {target}")
    cfg = load_recipe(args.target, args.overrides)
    print(describe({"config": to_dict(cfg)}))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from myriad.config import DEFAULT_RECIPE, load_recipe
    from myriad.engine.cluster import load_cluster
    from myriad.engine.plan_report import format_plan
    from myriad.engine.planner import make_plan

    cfg = load_recipe(args.recipe or DEFAULT_RECIPE, args.overrides)
    print(format_plan(make_plan(cfg, load_cluster(args.cluster))))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from myriad.eval.cli import finetune_command

    return finetune_command(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from myriad.eval.cli import evaluate_command

    return evaluate_command(args)


def cmd_export(args: argparse.Namespace) -> int:
    from myriad.engine.dcp_weights import DCP_DIR
    from myriad.train.checkpoint import export_weights, resolve_checkpoint

    step_dir = Path(args.shards)
    if not any(step_dir.glob("engine-rank*-of-*.json")) and not (step_dir / DCP_DIR).is_dir():
        step_dir = resolve_checkpoint(step_dir)  # a run or checkpoints dir: its latest step
    print(f"wrote {export_weights(step_dir, Path(args.out))}")
    return 0


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"myriad: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("myriad: interrupted", file=sys.stderr)
        return 130
