"""``myriad pretrain``: prepare data, build the run's objects once, train, checkpoint, plot.

A run directory holds ``config.json`` (the resolved config), ``tokenizer.json`` and the data cache
(from ``myriad.data``), ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` and the PNG plots.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from myriad.config import RunConfig, from_dict, to_dict
from myriad.data import curriculum
from myriad.engine import runtime as engine_runtime
from myriad.errors import UserError
from myriad.model import MoETransformerLM, count_parameters
from myriad.train import checkpoint, hotstart, shard_checkpoint
from myriad.train.config import TrainConfig
from myriad.train.device import autocast_factory, precision_name, resolve_device
from myriad.train.loop import BatchStream, Loop, run_loop
from myriad.train.metrics import MetricsLogger, read_metrics, truncate_metrics
from myriad.train.optim import build_scheduler, lr_multiplier
from myriad.train.plots import plot_expert_load, plot_losses
from myriad.train.routing_stats import count_batches, token_counts
from myriad.train.state import Progress, restore_rng, restore_trainer_state, seed_everything
from myriad.train.step import Batch, TrainStep

# Keys a resumed run may change: cadences, where it runs, and how long (the cosine then stretches).
RESUMABLE_CHANGES = frozenset(
    {
        "name",
        "description",
        "train.steps",
        "train.eval_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.device",
        "train.precision",
        "train.activation_checkpointing",  # the same arithmetic, recomputed
        "engine.device_budget_mb",
        "engine.prefetch_mb",
        "engine.gather_ahead",
        "engine.timeout_s",
        "engine.backend",
        "engine.chunk_mb",  # engine shards are read by parameter name, whatever the layout
        "engine.expert_parallel_size",
    }
)
RUN_MARKERS = ("config.json", "checkpoints", "metrics.jsonl")


class PreparedData(Protocol):
    """What ``myriad.data.prepare_data`` returns (the data pipeline's contract)."""

    tokenizer_path: Path
    vocab_size: int
    num_train_sequences: int
    num_heldout_sequences: int
    num_tokens: int

    def train_stream(self, batch_size: int, seed: int) -> BatchStream: ...
    def heldout_batches(self, batch_size: int, max_batches: int, seed: int) -> list[Batch]: ...
    def curriculum_stream(self, base: Any, batches_per_step: int) -> BatchStream: ...


@dataclass
class PretrainResult:
    """Where a finished run put things, and the losses worth printing."""

    out_dir: Path
    checkpoint: Path  # the final step directory
    metrics_path: Path  # metrics.jsonl
    plot_paths: list[Path]  # loss.png, then expert_load.png (absent for a dense model)
    tokenizer_path: Path
    steps: int
    tokens_seen: int
    final_train_loss: float | None
    final_heldout_loss: float | None
    first_heldout_loss: float | None


def load_run_config(out_dir: Path) -> RunConfig:
    """The resolved config a run wrote at start, e.g. for ``--resume`` without a recipe."""
    path = Path(out_dir) / "config.json"
    return from_dict(RunConfig, checkpoint.read_json(path), where=str(path))


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``to_dict`` trees."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _check_resume_config(saved: dict[str, Any], cfg: dict[str, Any], step_dir: Path) -> list[str]:
    """Refuse a resume whose config changes what was trained; return the harmless changes."""
    changed = config_differences(saved, cfg)
    blocking = [k for k in changed if k not in RESUMABLE_CHANGES]
    if blocking:
        details = "; ".join(
            f"{k}: checkpoint {_get(saved, k)!r}, now {_get(cfg, k)!r}" for k in blocking
        )
        raise UserError(
            f"cannot resume from {step_dir}: config differs from the checkpoint's at {details}"
        )
    return changed


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _check_out_dir(out_dir: Path, resume: bool, root: Path) -> Path | None:
    """The checkpoint in ``root`` to resume from, or None for a fresh run in an empty/new
    directory."""
    if resume:
        found = checkpoint.latest_checkpoint(root)
        if found is None:
            raise UserError(
                f"--resume: no checkpoint in {root} to resume from; "
                f"to start over, delete {out_dir} or choose another --out"
            )
        return found
    existing = [m for m in RUN_MARKERS if (out_dir / m).exists()]
    if existing:
        raise UserError(
            f"{out_dir} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it, or choose another --out"
        )
    return None


def _write_config(out_dir: Path, cfg: RunConfig) -> None:
    tmp = out_dir / ".config.json.tmp"
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "config.json")


def _prepare_data(cfg: RunConfig, out_dir: Path) -> PreparedData:
    """The real data pipeline (looked up at call time, so tests can substitute a small corpus)."""
    from myriad import data as data_pkg

    prepared: PreparedData = data_pkg.prepare_data(
        cfg.data,
        vocab_size=cfg.model.vocab_size,
        objective=cfg.model.objective,
        out_dir=out_dir,
        seed=cfg.train.seed,
    )
    if prepared.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"tokenizer has {prepared.vocab_size} ids but model.vocab_size is "
            f"{cfg.model.vocab_size}; raise model.vocab_size"
        )
    return prepared


def build_loop(cfg: RunConfig, out_dir: Path, prepared: PreparedData) -> Loop:
    """Every object of the run, in seed order: model init first, then optimizer, then data."""
    runtime = engine_runtime.start(cfg.engine, resolve_device(cfg.train.device))
    device = runtime.device
    autocast = autocast_factory(cfg.train.precision, device)
    seed_everything(cfg.train.seed)
    model = MoETransformerLM(cfg.model).to(device)
    model.checkpoint_blocks = cfg.train.activation_checkpointing
    if cfg.model.moe.balanced_init:  # frequency-balanced routing bins, counted on a fresh stream
        b = cfg.train.batch_size
        n = count_batches(prepared.num_train_sequences, b)
        counts_V = token_counts(prepared.train_stream(b, cfg.train.seed), n, cfg.model.vocab_size)
        model.init_balanced_routing(counts_V.to(device))
    probe_BS = torch.zeros(1, min(4, cfg.model.max_seq_len), dtype=torch.long, device=device)
    optimizer, sync = engine_runtime.wrap(runtime, model, cfg.train, lambda: model(probe_BS))
    scheduler = build_scheduler(optimizer, cfg.train)
    t = cfg.train
    step_fn = TrainStep(
        model,
        optimizer,
        scheduler,
        grad_clip=t.grad_clip,
        autocast=autocast,
        device=device,
        sync=sync,
    )
    stream: BatchStream = prepared.train_stream(t.batch_size, runtime.stream_seed(t.seed))
    if curriculum.is_enabled(cfg.data.curriculum):
        stream = prepared.curriculum_stream(stream, batches_per_step=t.grad_accum)
    return Loop(
        train_cfg=t,
        config_dict=to_dict(cfg),
        checkpoint_root=shard_checkpoint.checkpoint_root(out_dir, cfg.engine.kind),
        model=model,
        step_fn=step_fn,
        stream=stream,
        heldout=prepared.heldout_batches(t.batch_size, t.eval_batches, t.seed),
        autocast=autocast,
        device=device,
    )


def _restore(loop: Loop, step_dir: Path) -> Progress:
    """Weights, optimizer, schedule, data position, then the RNGs (last, so nothing moves them).

    A sharded checkpoint: this rank's shards and moments, and its own trainer state (a rank the
    checkpoint lacks: rank 0's, with its own data stream moved to rank 0's position)."""
    step_fn = loop.step_fn
    parts = engine_runtime.checkpoint_parts(step_fn.sync, loop.model, step_fn.optimizer)
    own = True
    if parts is not None and parts.holds(step_dir):
        state, own = shard_checkpoint.load_rank(parts, step_dir)
    else:
        checkpoint.load_weights(loop.model, step_dir)
        state = checkpoint.load_state(step_dir)
    progress = restore_trainer_state(state, loop.step_fn.optimizer, loop.step_fn.scheduler)
    if own:
        loop.stream.load_state_dict(state["data_stream"])
    else:
        loop.stream.follow(state["data_stream"])
    loop.routing.load_state_dict(state.get("routing_monitor"))
    restore_rng(state["rng"])
    return progress


def _validate(cfg: RunConfig) -> None:
    t = cfg.train
    for key, value in (
        ("steps", t.steps),
        ("batch_size", t.batch_size),
        ("grad_accum", t.grad_accum),
    ):
        if value < 1:
            raise UserError(f"train.{key} must be >= 1, got {value}")
    for name, number, ok, allowed in (  # the optimizer's own checks raise bare ValueErrors
        ("lr", t.lr, t.lr > 0, "> 0"),
        ("beta1", t.beta1, 0 <= t.beta1 < 1, "in [0, 1)"),
        ("beta2", t.beta2, 0 <= t.beta2 < 1, "in [0, 1)"),
        ("eps", t.eps, t.eps >= 0, ">= 0"),
        ("weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("min_lr_ratio", t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
        ("warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("grad_clip", t.grad_clip, t.grad_clip >= 0, ">= 0 (0 never clips)"),
        ("eval_batches", t.eval_batches, t.eval_batches >= 0, ">= 0 (0 uses them all)"),
        ("keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 0, ">= 0 (0 keeps all)"),
    ):
        if not ok:
            raise UserError(f"train.{name} must be {allowed}, got {number}")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise UserError(
            f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})"
        )
    if t.freeze_routing_step < 0 or (t.freeze_routing_step and not cfg.model.shared_routing):
        raise UserError(
            f"train.freeze_routing_step ({t.freeze_routing_step}) needs an MoE model with "
            "model.moe.router_input 'word' or 'routing_embedding', and must be >= 0"
        )


def _log_start(log: Callable, cfg: RunConfig, loop: Loop, prepared: PreparedData) -> None:
    counts = count_parameters(cfg.model)
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    log(f"params: {counts.total:,} total, {counts.active:,} active per token")
    log(
        f"data: {prepared.num_tokens:,} tokens; {prepared.num_train_sequences:,} train and "
        f"{prepared.num_heldout_sequences:,} held-out sequences of {cfg.data.seq_len}"
    )
    log(
        f"device: {loop.device} ({precision_name(t.precision, loop.device)}); {t.steps} steps of "
        f"{tokens_per_step:,} tokens = {t.steps * tokens_per_step:,} tokens"
    )
    if warning := schedule_warning(t):
        log(warning)


def schedule_warning(t: TrainConfig) -> str | None:
    """A warning when warm-up outlasts the run: legal (a short test of a long recipe), rarely
    meant, so it is said rather than refused."""
    if t.warmup_steps < t.steps:
        return None
    peak = lr_multiplier(t.steps - 1, steps=t.steps, warmup_steps=t.warmup_steps, min_lr_ratio=0)
    return (
        f"warning: train.warmup_steps ({t.warmup_steps}) >= train.steps ({t.steps}): the "
        f"learning rate never leaves warm-up (it peaks at {peak:.0%} of train.lr on the last "
        "step) and never decays"
    )


def run_pretrain(
    cfg: RunConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    log: Callable[[str], Any] = print,
) -> PretrainResult:
    """Pre-train ``cfg`` into ``out_dir``; with ``resume`` continue from its latest checkpoint.

    A resumed CPU run produces the same loss sequence, bit for bit, as one never interrupted.

    Raises:
        UserError: ``out_dir`` holds a run and ``resume`` is False; ``resume`` without a
            checkpoint, or with a config that changes a trained-on key; bad data or config.
    """
    given = Path(out_dir)
    out_dir = engine_runtime.rank_dir(given)  # torchrun: ranks > 0 write below it
    _validate(cfg)
    if cfg.train.init_from:
        cfg = hotstart.prepare_config(cfg)  # reuse the source run's tokenizer
    root = shard_checkpoint.checkpoint_root(out_dir, cfg.engine.kind)
    resume_from = _check_out_dir(out_dir, resume, root)
    if resume_from is not None:
        if change := shard_checkpoint.check_resume(resume_from, cfg.engine.kind):
            log(change)
        saved = checkpoint.read_json(resume_from / checkpoint.CONFIG)
        for key in _check_resume_config(saved, to_dict(cfg), resume_from):
            log(f"resume: {key} changed from {_get(saved, key)!r} to {_get(to_dict(cfg), key)!r}")
    # The outermost folder this process creates, which a failure below removes again (ranks > 0:
    # their own folder only, never rank 0's).
    mine = (*reversed(given.parents), given) if out_dir == given else (out_dir,)
    created = next((p for p in mine if not p.exists()), None)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # --out names a file, or a folder below one
        raise UserError(f"cannot create the run directory {out_dir}: {exc}") from None
    try:
        # Bad data fails here, before the run is marked; under torchrun rank 0 prepares, then
        # the other ranks reuse its tokenizer and cache.
        prepared = engine_runtime.rank0_first(lambda d: _prepare_data(cfg, d), out_dir, cfg.engine)
        loop = build_loop(cfg, out_dir, prepared)
        if cfg.train.init_from and resume_from is None:
            engine = engine_runtime.sharding_engine(loop.step_fn.sync)
            mode = hotstart.init_from_checkpoint(loop.model, cfg, engine)
            log(f"hot-start ({mode}) from {cfg.train.init_from}")
    except UserError:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    _log_start(log, cfg, loop, prepared)
    progress = Progress()
    if resume_from is not None:
        progress = _restore(loop, resume_from)
        truncate_metrics(out_dir / "metrics.jsonl", progress.step)
        log(f"resuming from {resume_from} (step {progress.step})")
    _write_config(out_dir, cfg)  # after the restore: a failed resume leaves the run's config

    metrics = MetricsLogger(out_dir, total_steps=cfg.train.steps, start_step=progress.step, log=log)
    try:
        progress = run_loop(loop, progress, metrics)
    finally:
        metrics.close()
    return _finish(out_dir, loop, progress, prepared, metrics.path)


def _finish(
    out_dir: Path, loop: Loop, progress: Progress, prepared: PreparedData, metrics_path: Path
) -> PretrainResult:
    """Plots from the whole run's metrics; the final checkpoint (saved now if the loop had none)."""
    final = checkpoint.latest_checkpoint(loop.checkpoint_root)
    if final is None or final.name != checkpoint.step_dir_name(progress.step):
        from myriad.train.loop import save

        final = save(loop, progress, loop.train_cfg.keep_checkpoints)
    plots = [plot_losses(read_metrics(metrics_path), out_dir / "loss.png")]
    if progress.expert_load_LE is not None:
        plots.append(plot_expert_load(progress.expert_load_LE, out_dir / "expert_load.png"))
    return PretrainResult(
        out_dir=out_dir,
        checkpoint=final,
        metrics_path=metrics_path,
        plot_paths=plots,
        tokenizer_path=Path(prepared.tokenizer_path),
        steps=progress.step,
        tokens_seen=progress.tokens_seen,
        final_train_loss=progress.last.get("loss"),
        final_heldout_loss=progress.last.get("heldout_loss"),
        first_heldout_loss=progress.last.get("first_heldout_loss"),
    )
