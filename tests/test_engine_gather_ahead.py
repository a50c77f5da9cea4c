"""All-gathers started ahead of use (``engine.gather_ahead``), on 2 gloo ranks.

The cursor follows the warm-up's gather order and never looks past the step's end. Through the
engine, every mode gives the single-process losses, gathering ahead gives exactly the losses of
gathering on demand (one thread per rank, so bit for bit), gathers do start ahead after the
warm-up, and the budget holds. Ranks whose budgets leave different room agree on one depth (the
smallest), since a gather started ahead on one rank only would pair with another collective on
the other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_engine_support import init_rank, reference_losses, run_config, spawn, train_mode

from myriad.engine.gather_ahead import GatherOrder

STEPS = 4
CHUNK_MB = 0.02  # the tiny model spans 7 chunks
BUDGET_MB = 0.35  # evicts every step, with room for one more gathered chunk
TIGHT_MB = 0.2  # no room for a chunk more than the step needs: gathers stay on demand
MODES = {
    "off": {"chunk_mb": CHUNK_MB, "gather_ahead": 0},
    "on": {"chunk_mb": CHUNK_MB, "gather_ahead": 1},
    "deep": {"chunk_mb": CHUNK_MB, "gather_ahead": 3},
    "offload": {"chunk_mb": CHUNK_MB, "device_budget_mb": BUDGET_MB},
    "ep_offload": {"chunk_mb": CHUNK_MB, "device_budget_mb": BUDGET_MB, "expert_parallel": True},
}


def test_order_follows_the_warmup_trace():
    order = GatherOrder()
    for cid in (0, 1, 2, 1, 0):  # forward 0 1 2, backward 1 0 (2 stayed gathered)
        order.record(cid)
    assert order.next_after(0) == []  # depth 0 until the ranks agree on one
    order.depth = 2
    assert order.next_after(0) == [1, 2]
    assert order.next_after(1) == [2, 1]
    assert order.next_after(5) == []  # not in the trace: no guess, the cursor stays
    assert order.next_after(2) == [1, 0]
    assert order.next_after(1) == [0]
    assert order.next_after(0) == []  # the step's end: nothing of the next step
    order.restart()
    assert order.next_after(1) == [2, 1]  # skips ahead to 1's first gather


def _worker(rank: int, world: int, port: int, out: str) -> None:
    comm = init_rank(rank, world, port)
    shard, full = torch.full((3,), float(rank)), torch.empty(6)
    wait = comm.all_gather(full, shard, async_op=True)
    assert wait is not None  # started, not finished: gloo runs it on its own threads
    wait()
    results: dict = {"async_gather": full.tolist()}
    results |= {name: train_mode(comm, STEPS, **kw)[1] for name, kw in MODES.items()}
    budget = 0.0 if rank == 0 else TIGHT_MB  # rank 0 has room to gather ahead, rank 1 not
    results["mixed"] = train_mode(comm, STEPS, chunk_mb=CHUNK_MB, device_budget_mb=budget)[1]
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather_ahead")
    spawn(_worker, 2, str(out))
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    return ranks, reference_losses(run_config(), world=2, steps=STEPS)


def test_async_all_gather(runs):
    ranks, _ = runs
    assert all(r["async_gather"] == [0.0] * 3 + [1.0] * 3 for r in ranks)


@pytest.mark.parametrize("mode", [*MODES, "mixed"])
def test_every_mode_matches_single_process(runs, mode):
    ranks, ref = runs
    for r in ranks:
        assert r[mode]["losses"] == pytest.approx(ref, rel=1e-5)


def test_gathering_ahead_changes_no_bit(runs):
    ranks, _ = runs
    for r in ranks:
        assert r["on"]["losses"] == r["off"]["losses"] == r["deep"]["losses"]


@pytest.mark.parametrize("mode", ["on", "deep", "offload", "ep_offload"])
def test_gathers_start_ahead_after_the_warmup(runs, mode):
    ranks, _ = runs
    want = MODES[mode].get("gather_ahead", 1)
    for r in ranks:
        report = r[mode]["report"]
        assert report["gather_ahead"] == want
        assert report["gathers_ahead"] > 0
        if report["budget_bytes"]:
            assert 0 < report["peak_device_bytes"] <= report["budget_bytes"]
    off = ranks[0]["off"]["report"]
    assert off["gather_ahead"] == off["gathers_ahead"] == 0


def test_ranks_agree_on_the_smallest_depth(runs):
    ranks, _ = runs
    assert [r["mixed"]["report"]["gather_ahead"] for r in ranks] == [0, 0]
    assert [r["mixed"]["report"]["gathers_ahead"] for r in ranks] == [0, 0]
