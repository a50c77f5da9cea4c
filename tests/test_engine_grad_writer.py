"""Reduced gradient shards are copied into zeroed gradient shards and added into the others.

The writer alone: a clean shard receives a copy, a used one a sum. Through the engine in one
process, with two micro-batches per step (the second one adds), under an evicting budget and
with the optimizer step overlapped: the losses and weights equal the plain model's, every
shard is marked used after the backward and clean again once its gradient is zeroed.
"""

from __future__ import annotations

import pytest
import torch
from test_engine_support import (
    apply_engine,
    batches,
    build_model,
    make_step,
    reference_losses,
    run_config,
)

from myriad.engine.comm import Comm
from myriad.engine.grad_writer import GradWriter

STEPS = 3


def test_copy_into_clean_shard_add_into_used_one():
    writer, grad = GradWriter(), torch.zeros(4)
    writer.write(0, grad, torch.tensor([1.0, -0.0, 2.0, 3.0]), clean=True)
    writer.write(0, grad, torch.tensor([0.5, 1.0, 1.0, -3.0]), clean=False)
    assert grad.tolist() == [1.5, 1.0, 3.0, 0.0]
    assert writer.pending == {} and writer.async_copies == 0  # no CUDA: copies are synchronous


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"chunk_mb": 0.02, "device_budget_mb": 0.35},
        {"chunk_mb": 0.02, "overlap_step": "on", "device_budget_mb": 0.35},
    ],
    ids=["plain", "offload", "offload_overlapped"],
)
def test_two_micro_batches_match_the_plain_model(one_thread, kw):
    cfg = run_config()
    model = build_model(cfg)
    engine = apply_engine(model, Comm(), **kw)
    step = make_step(model, cfg, engine)
    chunks = engine.store.chunks
    after_backward = []
    clip = engine.clip_grad_norm_

    def clip_and_record(max_norm: float) -> torch.Tensor:  # runs right after the backward
        after_backward.append([c.grad_clean for c in chunks])
        return clip(max_norm)

    engine.clip_grad_norm_ = clip_and_record  # type: ignore[method-assign]
    assert all(c.grad_clean for c in chunks)
    losses = []
    for s in range(STEPS):
        losses.append(step(batches(s, 2)).loss)  # two micro-batches: copy, then add
        engine.synchronize()  # overlapped updates zero their shards in the worker thread
        assert all(c.grad_clean for c in chunks)
    assert after_backward == [[False] * len(chunks)] * STEPS
    assert losses == pytest.approx(reference_losses(cfg, world=2, steps=STEPS), rel=1e-5)
