"""``engine.overlap_step``: host-resident payloads' Adam in a background thread, overlapped with
the next forward. The losses and weights must be bit-identical to the serial step's (the same
kernel per shard; every read of a payload waits for its update), with fp32 and with bf16
parameters and gradients, under a budget that evicts every step."""

from __future__ import annotations

import threading

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
from myriad.engine.overlap import UpdateWorker

STEPS = 5
ENGINE = {"chunk_mb": 0.02, "device_budget_mb": 0.35}


def _train(**engine_kw):
    cfg = run_config()
    model = build_model(cfg)
    engine = apply_engine(model, Comm(), **ENGINE, **engine_kw)
    step_fn = make_step(model, cfg, engine)
    losses = [step_fn(batches(s, 1)).loss for s in range(STEPS)]
    return losses, engine.full_state_dict(), engine.report()


@pytest.mark.parametrize(
    "precision",
    [{}, {"param_dtype": "bfloat16", "reduce_dtype": "bfloat16"}],
    ids=["fp32", "bf16"],
)
def test_overlapped_step_is_bit_identical_to_the_serial_one(precision, one_thread):
    """One thread each: a CPU matmul's summation order may change with the threads it gets,
    and two threads on one CPU share its cores (a GPU's kernels do not depend on the CPU's)."""
    serial_losses, serial_weights, serial = _train(overlap_step="off", **precision)
    losses, weights, report = _train(overlap_step="on", **precision)
    assert serial["overlapped_updates"] == 0
    # every step after the warm-up hands its host-resident payloads to the thread
    assert report["overlapped_updates"] >= STEPS - 1 and report["evictions"] > 0
    assert losses == serial_losses
    assert weights.keys() == serial_weights.keys()
    for name, value in weights.items():
        assert torch.equal(value, serial_weights[name]), name
    if not precision:
        assert losses == pytest.approx(reference_losses(run_config(), 1, STEPS), rel=1e-5)


def test_auto_overlaps_on_cuda_only(one_thread):
    _, _, report = _train()
    assert report["overlapped_updates"] == 0  # auto on a CPU: the cores are the same ones


def test_worker_returns_at_once_runs_in_order_and_reraises():
    worker, gate, ran = UpdateWorker(), threading.Event(), []
    worker.submit(0, lambda: (gate.wait(5), ran.append(0)))
    worker.submit(1, lambda: ran.append(1))
    assert ran == []  # submit did not wait for the blocked update
    gate.set()
    worker.wait(1)
    assert ran == [0, 1]

    def fail():
        raise RuntimeError("update failed")

    worker.submit(2, fail)
    with pytest.raises(RuntimeError, match="update failed"):
        worker.wait_all()
    worker.wait(2)  # reported once


def test_updates_run_without_grad():
    worker, seen = UpdateWorker(), []
    worker.submit(0, lambda: seen.append(torch.is_grad_enabled()))
    worker.wait(0)
    assert seen == [False]
