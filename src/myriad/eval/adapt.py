"""Task-adaptive pre-training (Gururangan et al., 2020, "Don't Stop Pretraining").

Before fine-tuning, a pre-trained checkpoint continues its own masked-LM (or causal) pre-training
for a few steps on the task's *training* texts, labels unused: the built-in checkpoints learned
1998 news, while ``zh-sentiment`` is product and hotel reviews. Every text of the training split
(both sides of a pair, each as its own document) is written once to ``texts.txt``; dev and test
texts are never read. The run is an ordinary ``myriad pretrain --init-from CKPT`` (same recipe,
tokenizer and optimizer settings; warm-up capped at a tenth of the steps, no curriculum, one
process) in ``<work>/adapt-TASK-NAME/run``, reused when a finished one has the same source and
steps. With ``scratch`` the same run starts from random weights instead (the checkpoint gives
only its recipe and tokenizer): the control that tells how much of the gain is the checkpoint's
pre-training and how much the in-domain masked-LM alone.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from myriad.data.config import CurriculumConfig
from myriad.engine.config import EngineConfig
from myriad.eval.outputs import write_text_atomic
from myriad.eval.tasks import Task
from myriad.train import checkpoint, hotstart, run_pretrain


def training_texts(task: Task) -> list[str]:
    """The training split's texts, each once, in order of first appearance."""
    texts = (t for ex in task.splits["train"] for t in (ex.text_a, ex.text_b) if t)
    return list(dict.fromkeys(" ".join(t.split()) for t in texts))


def adapt_checkpoint(
    task: Task,
    name: str,
    ckpt: Path,
    steps: int,
    work: Path,
    log: Callable[[str], None],
    scratch: bool = False,
) -> Path:
    """The run directory of ``ckpt`` (``scratch``: of its architecture, randomly initialised)
    after ``steps`` steps of pre-training on ``task``'s texts.

    Suite processes sharing ``work`` (one per seed) take turns: the first trains, the others
    wait on a file lock and reuse its run."""
    out = work / f"adapt-{task.name}-{name}"
    work.mkdir(parents=True, exist_ok=True)
    with (work / f"{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _adapt(task, name, ckpt, steps, out, log, scratch)


def _adapt(
    task: Task,
    name: str,
    ckpt: Path,
    steps: int,
    out: Path,
    log: Callable[[str], None],
    scratch: bool,
) -> Path:
    step_dir, cfg = hotstart.source_checkpoint(str(ckpt))
    run, marker = out / "run", {"source": str(step_dir), "steps": steps, "scratch": scratch}
    done = out / "adapt.json"
    finished = done.is_file() and checkpoint.latest_checkpoint(run / "checkpoints") is not None
    if finished and json.loads(done.read_text(encoding="utf-8")) == marker:
        log(f"  {task.name} {name}: reusing task-adaptive pre-training {run}")
        return run
    shutil.rmtree(out, ignore_errors=True)  # unfinished, or other settings
    out.mkdir(parents=True)
    corpus = out / "texts.txt"
    write_text_atomic(corpus, "".join(t + "\n" for t in training_texts(task)))
    t = cfg.train
    # from scratch: random weights, the checkpoint's tokenizer (hot-starting reuses it anyway)
    tokenizer = str(hotstart.source_tokenizer(step_dir)) if scratch else cfg.data.tokenizer
    cfg = dataclasses.replace(
        cfg,
        engine=EngineConfig(),  # one process, whatever engine the checkpoint was trained with
        data=dataclasses.replace(
            cfg.data,
            corpus=str(corpus),
            format="text",
            max_documents=0,
            curriculum=CurriculumConfig(),
            tokenizer=tokenizer,
        ),
        train=dataclasses.replace(
            t,
            steps=steps,
            init_from="" if scratch else str(step_dir),
            warmup_steps=min(t.warmup_steps, steps // 10),
            eval_every=max(steps // 4, 1),
            checkpoint_every=steps,
            keep_checkpoints=1,
            freeze_routing_step=0,
        ),
    )
    result = run_pretrain(cfg, run, log=lambda _: None)
    write_text_atomic(done, json.dumps(marker) + "\n")
    losses = (result.first_heldout_loss, result.final_heldout_loss)
    held = " -> ".join("-" if x is None else f"{x:.3f}" for x in losses)
    log(f"  {task.name} {name}: task-adaptive pre-training, {steps} steps, held-out loss {held}")
    return run
