"""Fine-tune a checkpoint on a classification task; write its outputs atomically.

The loop reads top to bottom: batch -> forward -> loss -> backward -> clip -> step -> (every
``eval_every`` steps) dev accuracy -> keep the best weights -> stop after ``patience`` evaluations
without improvement. The best weights are then scored on dev and used for test predictions.

Outputs in ``out_dir`` (written into a hidden temporary folder, then renamed into place, so a
failed run leaves nothing half-written): ``model.safetensors`` (classifier weights),
``config.json`` (base model config, task, label set, fine-tune settings), ``tokenizer.json``,
``summary.json`` (dev metrics, test metrics when the task has test labels, timings, the
best step), ``metrics.jsonl`` (one line per dev evaluation) and the test predictions in CLUE's
submission format (``{"id": ..., "label": ...}`` per line).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from myriad.config import to_dict
from myriad.data.tokenizer import special_ids
from myriad.errors import UserError
from myriad.eval.encode import Encoded, encode_examples, length_sorted_batches, make_batch
from myriad.eval.heads import SequenceClassifier, load_backbone
from myriad.eval.metrics import score
from myriad.eval.outputs import check_out_dir, write_outputs
from myriad.eval.tasks import Task
from myriad.train.device import resolve_device


@dataclass(kw_only=True)
class FinetuneConfig:
    """Fine-tuning settings; the defaults suit the tiny-zh checkpoints on a CPU."""

    seed: int = 0
    lr: float = 3e-4
    weight_decay: float = 0.01
    batch_size: int = 32
    max_len: int = 128  # tokens per example, [CLS]/[SEP] included; capped at model.max_seq_len
    epochs: float = 2.0
    max_steps: int = 0  # > 0 stops after this many steps whatever ``epochs`` says
    warmup_ratio: float = 0.06
    dropout: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100  # dev evaluation every N steps, and at the end
    patience: int = 3  # stop after this many dev evaluations without a better accuracy
    eval_batch_size: int = 128
    from_scratch: bool = False  # same architecture, random init: the baseline
    device: str = "auto"

    def validate(self) -> None:
        checks = [
            (self.lr > 0, "--lr must be > 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.max_len >= 4, "--max-len must be >= 4"),
            (self.epochs > 0 or self.max_steps > 0, "--epochs or --max-steps must be > 0"),
            (self.eval_every >= 1, "--eval-every must be >= 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
            (0 <= self.warmup_ratio <= 1, "--warmup-ratio must be in [0, 1]"),
            (self.patience >= 1, "--patience must be >= 1"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class FinetuneResult:
    out_dir: Path
    dev: dict[str, float]
    test: dict[str, float] | None
    best_step: int
    steps: int
    seconds: float


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(
    model: SequenceClassifier, data: Encoded, batch_size: int, pad_id: int, device: torch.device
) -> list[int]:
    """Arg-max class of every example, in the split's order."""
    was_training = model.training
    model.eval()
    pred = [0] * len(data)
    for rows in length_sorted_batches(data, batch_size):
        batch = make_batch(data, rows, pad_id, device)
        logits_BC, _ = model(batch["input_ids"], batch["attention_mask"])
        for r, p in zip(rows, logits_BC.argmax(dim=-1).tolist(), strict=True):
            pred[r] = p
    model.train(was_training)
    return pred


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to 0: the usual BERT fine-tuning schedule."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _train_loop(
    model: SequenceClassifier,
    train: Encoded,
    dev: Encoded,
    cfg: FinetuneConfig,
    ctx: dict[str, Any],
) -> tuple[int, int, list[dict[str, Any]]]:
    """Train with early stopping on dev accuracy; leaves the best weights in ``model``."""
    device, pad_id, num_classes = ctx["device"], ctx["pad_id"], ctx["num_classes"]
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, total, max(1, int(cfg.warmup_ratio * total)))
    )
    rng = random.Random(cfg.seed)
    order: list[int] = []
    best_acc, best_step, best_state, bad_evals, history = -1.0, 0, None, 0, []
    bar = tqdm(total=total, desc=ctx["desc"], disable=not ctx["progress"], leave=False)
    step = 0
    while step < total:
        if len(order) < cfg.batch_size:  # a new epoch, reshuffled
            order += rng.sample(range(len(train)), len(train))
        rows, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = make_batch(train, rows, pad_id, device)
        logits_BC, aux = model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits_BC.float(), batch["labels"]) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", best_dev=f"{max(best_acc, 0):.3f}")
        if step % cfg.eval_every == 0 or step == total:
            pred = predict(model, dev, cfg.eval_batch_size, pad_id, device)
            metrics = score(dev.labels, pred, num_classes)
            history.append({"step": step, "train_loss": loss.item(), **metrics})
            if metrics["accuracy"] > best_acc:
                best_acc, best_step, bad_evals = metrics["accuracy"], step, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_evals += 1
                if bad_evals >= cfg.patience:
                    break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return step, best_step, history


def run_finetune(
    task: Task,
    checkpoint: Path,
    out_dir: Path,
    cfg: FinetuneConfig,
    *,
    tokenizer_path: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune ``checkpoint`` on ``task`` and write the outputs to ``out_dir``."""
    cfg.validate()
    check_out_dir(out_dir)  # before the training, not after it
    start = time.perf_counter()
    _seed_everything(cfg.seed)
    backbone, run_cfg, tokenizer, tok_path = load_backbone(
        checkpoint, tokenizer_path, from_scratch=cfg.from_scratch, seed=cfg.seed
    )
    device = resolve_device(cfg.device, "--device")
    model = SequenceClassifier(backbone, len(task.labels), cfg.dropout).to(device)
    max_len = min(cfg.max_len, run_cfg.model.max_seq_len)
    enc = {s: encode_examples(tokenizer, ex, task.labels, max_len) for s, ex in task.splits.items()}
    pad_id = special_ids(tokenizer)["pad"]
    ctx = {
        "device": device,
        "pad_id": pad_id,
        "num_classes": len(task.labels),
        "progress": progress,
        "desc": f"finetune {task.name}",
    }
    init = "random init" if cfg.from_scratch else f"checkpoint {checkpoint}"
    log(
        f"finetune {task.name}: {len(task.labels)} labels, "
        + ", ".join(f"{s} {len(e)}" for s, e in enc.items())
        + f"; {init}; pooling {model.pooling}; seed {cfg.seed}"
    )
    steps, best_step, history = _train_loop(model, enc["train"], enc["dev"], cfg, ctx)
    dev_pred = predict(model, enc["dev"], cfg.eval_batch_size, pad_id, device)
    dev = score(enc["dev"].labels, dev_pred, len(task.labels))
    test_pred, test = None, None
    if "test" in enc:
        test_pred = predict(model, enc["test"], cfg.eval_batch_size, pad_id, device)
        if task.test_labelled:
            test = score(enc["test"].labels, test_pred, len(task.labels))
    result = FinetuneResult(out_dir, dev, test, best_step, steps, time.perf_counter() - start)
    summary = {
        "task": task.name,
        "checkpoint": str(checkpoint),
        "from_scratch": cfg.from_scratch,
        "seed": cfg.seed,
        "dev": dev,
        "test": test,
        "best_step": best_step,
        "steps": steps,
        "seconds": round(result.seconds, 1),
        "examples": {s: len(e) for s, e in enc.items()},
        "skipped_without_gold_label": task.skipped,
    }
    config = {
        "base": to_dict(run_cfg),
        "task": task.name,
        "labels": list(task.labels.labels),
        "is_pair": task.is_pair,
        "pooling": model.pooling,
        "finetune": asdict(cfg),
    }
    outputs = {"config": config, "summary": summary, "history": history}
    _write(task, model, outputs, tok_path, test_pred, out_dir)
    return result


def _write(
    task: Task,
    model: SequenceClassifier,
    outputs: dict[str, Any],
    tokenizer_path: Path,
    test_pred: list[int] | None,
    out_dir: Path,
) -> None:
    """Test predictions in CLUE's submission format, then every output, atomically."""
    predictions = None
    if test_pred is not None:
        ids = [ex.id for ex in task.splits["test"]]
        predictions = [
            {"id": i, "label": task.labels.to_label(p)} for i, p in zip(ids, test_pred, strict=True)
        ]
    write_outputs(
        out_dir,
        model=model,
        config=outputs["config"],
        summary=outputs["summary"],
        history=outputs["history"],
        tokenizer_path=tokenizer_path,
        submission=(task.submission, predictions),
    )


def summary_line(result: FinetuneResult) -> str:
    """One line for the terminal."""
    test = f", test acc {result.test['accuracy']:.4f}" if result.test else ""
    return (
        f"dev acc {result.dev['accuracy']:.4f} macro-F1 {result.dev['macro_f1']:.4f}{test}; "
        f"best step {result.best_step}/{result.steps}; {result.seconds:.0f} s -> {result.out_dir}"
    )


def read_summary(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
