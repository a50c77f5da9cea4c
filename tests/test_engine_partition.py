"""Partitioning, offload and expert parallelism give the single-process losses (2 gloo ranks).

One spawn runs every mode in turn; each is compared with the single-process reference over the
same 4 steps (relative 1e-5), and the offload modes' budgets (small enough to force eviction
every step) are checked against the manager's peak device bytes.
"""

from __future__ import annotations

import pytest
from test_engine_support import reference_losses, run_config, run_engine

STEPS = 4
CHUNK_MB = 0.02  # 5,120 fp32 elements: the tiny model spans several chunks
BUDGET_MB = 0.35  # fits the chunks in use plus a few payloads: evicts every step
OVERLAP_BUDGET_MB = 0.2  # ... and leaves payloads on the host at the optimizer step
MODES = {
    "partition": {"chunk_mb": CHUNK_MB},
    "offload": {"chunk_mb": CHUNK_MB, "device_budget_mb": BUDGET_MB},
    "expert_parallel": {"chunk_mb": CHUNK_MB, "expert_parallel": True},
    "all": {"chunk_mb": CHUNK_MB, "device_budget_mb": BUDGET_MB, "expert_parallel": True},
    "all_overlapped": {  # host payloads' Adam in a background thread (test_engine_overlap.py)
        "chunk_mb": CHUNK_MB,
        "device_budget_mb": OVERLAP_BUDGET_MB,
        "expert_parallel": True,
        "overlap_step": "on",
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ranks = run_engine(tmp_path_factory.mktemp("engine"), world=2, steps=STEPS, modes=MODES)
    return ranks, reference_losses(run_config(), world=2, steps=STEPS)


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_match_single_process(runs, mode):
    ranks, ref = runs
    assert len(ref) == STEPS and ref[-1] < ref[0]
    for r in ranks:
        assert r[mode]["losses"] == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("mode", ["offload", "all", "all_overlapped"])
def test_budget_never_exceeded_and_evicts_every_step(runs, mode):
    ranks, _ = runs
    for r in ranks:
        report = r[mode]["report"]
        assert (report["overlapped_updates"] > 0) == (mode == "all_overlapped")
        assert 0 < report["peak_device_bytes"] <= report["budget_bytes"]
        budget = OVERLAP_BUDGET_MB if mode == "all_overlapped" else BUDGET_MB
        assert report["budget_bytes"] == int(budget * (1 << 20))
        assert all(n > 0 for n in r[mode]["evictions"]), r[mode]["evictions"]


def _one_process(budget_mb: float):
    """``STEPS`` steps of the engine in one process under ``budget_mb``; its losses must equal
    the reference's. Returns the model and the engine."""
    from test_engine_support import apply_engine, batches, build_model, make_step

    from myriad.engine.comm import Comm

    cfg = run_config()
    model = build_model(cfg)
    engine = apply_engine(model, Comm(), chunk_mb=CHUNK_MB, device_budget_mb=budget_mb)
    step_fn = make_step(model, cfg, engine)
    losses = [step_fn(batches(s, 1)).loss for s in range(STEPS)]
    assert losses == pytest.approx(reference_losses(cfg, world=1, steps=STEPS), rel=1e-5)
    return model, engine


def test_one_process_same_class_no_collectives():
    """World size 1 runs the same engine: chunks, hooks, optimizer; losses = reference."""
    import torch

    model, engine = _one_process(0.5)
    assert engine.report()["chunks"] > 3
    assert all(p.untyped_storage().size() == 0 for p in model.parameters())  # all released
    assert torch.is_tensor(engine.store.chunks[0].shard_S)


def test_tight_budget_sends_the_payload_in_use_home():
    """A budget where a gathered chunk fits only once its own payload has gone back to the host:
    the gather stages the shard from there, and the losses still equal the reference."""
    _, engine = _one_process(0.2)
    report = engine.report()
    assert report["in_use_evictions"] > 0 and report["peak_device_bytes"] <= report["budget_bytes"]


def test_a_device_index_does_not_book_resident_shards_as_staged():
    """A one-GPU engine runs on "cuda" while its payloads report "cuda:0"; here "cpu:0" against
    "cpu". With every payload resident, no gather may book staging bytes."""
    import torch
    from test_engine_support import batches, build_model, make_step

    from myriad.engine.comm import Comm
    from myriad.engine.config import EngineConfig
    from myriad.engine.engine import apply

    cfg = run_config()
    model = build_model(cfg)
    ids = torch.zeros(1, 4, dtype=torch.long)
    engine = apply(
        model,
        EngineConfig(kind="myriad", chunk_mb=CHUNK_MB, device_budget_mb=64),
        comm=Comm(),
        device=torch.device("cpu", 0),
        run_forward=lambda: model(ids),
    )
    booked = []  # the staging and cast bytes each gather accounts
    start = engine.store.gatherer.start

    def recording_start(comm, full_C, shard_S, nbytes, ahead):
        booked.append(nbytes)
        return start(comm, full_C, shard_S, nbytes, ahead)

    engine.store.gatherer.start = recording_start
    step_fn = make_step(model, cfg, engine)
    losses = [step_fn(batches(s, 1)).loss for s in range(2)]
    assert engine.report()["evictions"] == 0 and set(booked) == {0}
    assert losses == pytest.approx(reference_losses(cfg, world=1, steps=2), rel=1e-5)
