"""Learning-rate schedule against its closed form, and the weight-decay parameter split."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_support import tiny_config

from myriad.model import MoETransformerLM
from myriad.train.optim import build_optimizer, build_scheduler, lr_at, parameter_groups


def expected_lr(step, *, lr=1e-3, steps=100, warmup=10, min_ratio=0.1):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / (steps - warmup), 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_lr_at_known_steps():
    cfg = tiny_config(lr=1e-3, steps=100, warmup_steps=10, min_lr_ratio=0.1).train
    assert lr_at(0, cfg) == pytest.approx(1e-4, rel=1e-12)  # first warm-up step: lr / warmup
    assert lr_at(9, cfg) == pytest.approx(1e-3, rel=1e-12)  # warm-up ends at the peak
    assert lr_at(10, cfg) == pytest.approx(1e-3, rel=1e-12)  # cosine starts at the peak
    assert lr_at(55, cfg) == pytest.approx(1e-3 * 0.55, rel=1e-12)  # half-way: mid-point
    assert lr_at(100, cfg) == pytest.approx(1e-4, rel=1e-12)  # end: lr * min_lr_ratio
    assert lr_at(150, cfg) == pytest.approx(1e-4, rel=1e-12)  # past the end: stays at the floor
    for step in range(0, 120, 7):
        assert lr_at(step, cfg) == pytest.approx(expected_lr(step), rel=1e-12)


def test_scheduler_drives_optimizer_lr():
    cfg = tiny_config(lr=1e-3, steps=100, warmup_steps=10, min_lr_ratio=0.1)
    model = MoETransformerLM(cfg.model)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    sched = build_scheduler(opt, cfg.train)
    seen = []
    for _ in range(30):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([expected_lr(s) for s in range(30)], rel=1e-12)
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)


def test_decay_only_on_matrices_and_tied_embedding_once():
    model = MoETransformerLM(tiny_config().model)
    decay, no_decay = parameter_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    everything = decay["params"] + no_decay["params"]
    assert len({id(p) for p in everything}) == len(everything) == len(list(model.parameters()))
    assert any(p is model.embed.weight for p in decay["params"])


def test_resume_with_more_steps_follows_the_new_cosine_from_its_first_step():
    # A run saved after 6 of 10 steps and resumed with train.steps = 20: step 6 already uses
    # the recomputed cosine (docs/training.md, "Resume"), not the lr saved in the optimizer.
    from myriad.train.state import Progress, restore_trainer_state, trainer_state

    short = tiny_config(lr=1e-3, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    model = MoETransformerLM(short.model)
    opt = build_optimizer(model, short.train, torch.device("cpu"))
    sched = build_scheduler(opt, short.train)
    for _ in range(6):
        opt.step()
        sched.step()
    state = trainer_state(Progress(step=6), opt, sched, {})

    long = tiny_config(lr=1e-3, steps=20, warmup_steps=2, min_lr_ratio=0.1)
    opt2 = build_optimizer(model, long.train, torch.device("cpu"))
    sched2 = build_scheduler(opt2, long.train)
    restore_trainer_state(state, opt2, sched2)
    seen = []
    for _ in range(3):
        seen.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert seen == pytest.approx([lr_at(s, long.train) for s in range(6, 9)], rel=1e-12)
    assert all(g["lr"] == opt2.param_groups[0]["lr"] for g in opt2.param_groups)
