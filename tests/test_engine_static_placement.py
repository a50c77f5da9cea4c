"""Static placement (``engine.placement = "static"``, the default on CUDA): after the warm-up the
resident payloads are fixed, the first ones in order of use that fit the least room any position
leaves; the others stay on the host and their accesses are served from there. No payload moves
after the warm-up's end, the budget holds, and the losses are the dynamic placement's bit for
bit (one thread per rank) and the single-process reference's, on 2 gloo ranks with and without
expert parallelism. The same budget makes the dynamic policy move payloads every step, so the
budget is one that forces a choice.
"""

from __future__ import annotations

import pytest
from test_engine_support import reference_losses, run_config, run_engine

from myriad.engine.config import EngineConfig
from myriad.errors import UserError

STEPS = 5
BASE = {"chunk_mb": 0.02, "device_budget_mb": 0.35}  # the tiny model spans 7 chunks
MODES = {
    "dynamic": {**BASE, "placement": "dynamic"},
    "static": {**BASE, "placement": "static"},
    "static_ep": {**BASE, "placement": "static", "expert_parallel": True},
    "static_overlap": {**BASE, "placement": "static", "overlap_step": "on"},
    "static_bf16": {**BASE, "placement": "static", "param_dtype": "bfloat16"},
    "dynamic_bf16": {**BASE, "placement": "dynamic", "param_dtype": "bfloat16"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ranks = run_engine(tmp_path_factory.mktemp("static_placement"), 2, STEPS, MODES)
    return ranks, reference_losses(run_config(), world=2, steps=STEPS)


def _host_chunks(report: dict) -> int:
    return report["chunks"] - report["resident_chunks"]


@pytest.mark.parametrize("mode", ["dynamic", "static", "static_ep"])
def test_matches_single_process(runs, mode):
    ranks, ref = runs
    for r in ranks:
        assert r[mode]["losses"] == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("dtype", ["", "_bf16"])
def test_static_changes_no_bit(runs, dtype):
    ranks, _ = runs
    for r in ranks:
        assert r[f"static{dtype}"]["losses"] == r[f"dynamic{dtype}"]["losses"]


def test_host_payloads_update_during_the_next_forward(runs):
    """The overlapped step (the CUDA default) hands exactly the host-resident payloads, which
    static placement fixes, to the update thread, and changes no bit."""
    ranks, _ = runs
    for r in ranks:
        run = r["static_overlap"]
        assert run["losses"] == r["static"]["losses"]
        report = run["report"]
        assert report["overlapped_updates"] == _host_chunks(report) * (STEPS - 1)


@pytest.mark.parametrize("mode", ["static", "static_ep", "static_overlap", "static_bf16"])
def test_no_payload_moves_after_the_warmup(runs, mode):
    ranks, _ = runs
    for r in ranks:
        run = r[mode]
        report = run["report"]
        # The warm-up step evicts as it loads, and its end sends home what does not fit; after
        # that nothing moves.
        assert run["evictions"][0] > 0 and run["evictions"][1:] == [0] * (STEPS - 1)
        assert report["placement"] == "static"
        assert report["resident_chunks"] > 0 and _host_chunks(report) > 0
        assert report["host_accesses"] > 0
        assert 0 < report["peak_device_bytes"] <= report["budget_bytes"]


def test_dynamic_moves_payloads_every_step_under_the_same_budget(runs):
    ranks, _ = runs
    for r in ranks:
        assert all(n > 0 for n in r["dynamic"]["evictions"]), r["dynamic"]["evictions"]
        assert r["dynamic"]["report"]["placement"] == "dynamic"


def test_unknown_placement_is_a_user_error():
    with pytest.raises(UserError, match="engine.placement must be one of"):
        EngineConfig(kind="myriad", placement="belady").validate()
