"""Non-model memory traced in the warm-up, and payloads loaded ahead of use (prefetch).

The manager alone, with a fake device allocator as its probe: the traced non-model peaks are
exactly the scripted ones, and after the warm-up managed plus non-model bytes stay under the
budget at every position (without the probe the same step would overshoot it). Prefetch follows
Belady's rule: it moves the on-demand loads earlier, never adds one. The engine on 2 gloo ranks
under an evicting budget: losses equal the single-process reference with and without prefetch,
and prefetch turns most on-demand loads after the warm-up into prefetch hits, adding no load.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from test_engine_support import (
    apply_engine,
    batches,
    build_model,
    make_step,
    reference_losses,
    run_config,
    run_engine,
)

from myriad.engine.comm import Comm
from myriad.engine.placement import MARGIN, MARGIN_FLOOR, MemoryManager
from myriad.engine.prefetch import SideStream

CPU = torch.device("cpu")
PAYLOAD = 100  # bytes of each of the 4 fake payloads
# One fake step: (payload accessed, transient bytes while in use, non-model bytes after it).
# Non-model memory grows through the "forward" (activations) and falls in the "backward".
STEP = [(0, 50, 100), (1, 50, 200), (2, 50, 300), (3, 50, 300), (2, 50, 150), (1, 50, 50)]
STEP += [(c, 0, 50) for c in range(4)]  # the optimizer touches every payload


class FakeDevice:
    """A device allocator: payloads moved in and out, transient buffers, and a scripted amount
    of other memory. Its bytes change where real ones would: a buffer is allocated after the
    manager accounts for it and freed before, as the chunk store does."""

    def __init__(self) -> None:
        self.managed = 4 * PAYLOAD  # payloads are made on the device, then placed
        self.other = 0
        self.high = 0  # peak since the last probe

    def total(self) -> int:
        return self.managed + self.other

    def change(self, managed: int = 0, other: int | None = None) -> None:
        self.managed += managed
        self.other = self.other if other is None else other
        self.high = max(self.high, self.total())

    def move(self, cid: int, to_device: bool) -> None:
        self.change(PAYLOAD if to_device else -PAYLOAD)

    def probe(self) -> tuple[int, int]:
        now = self.total()
        peak, self.high = max(self.high, now), now
        return now, peak


def _run_steps(budget: int, probe: bool, steps: int = 3) -> tuple[MemoryManager, list[int]]:
    """Drive the manager through ``steps`` fake steps; the device totals after the warm-up."""
    dev = FakeDevice()
    m = MemoryManager(
        CPU,
        budget,
        dev.move,
        [PAYLOAD] * 4,
        probe=dev.probe if probe else None,
        prefetch_bytes=10**6,
        margin_floor=0,  # bytes here are toy numbers
    )
    m.place_initial()
    totals = []
    for _ in range(steps):
        for cid, transient, other in STEP:
            m.touch(cid)
            m.alloc(transient, keep=cid)
            dev.change(transient)
            dev.change(other=other)  # the module's compute makes (or frees) activations
            totals.append(dev.total())
            dev.change(-transient)
            m.free(transient)
            assert dev.managed == m.used  # the fake agrees with the manager's accounting
        m.end_step()
    return m, totals[len(STEP) :]


def test_nonmodel_trace_matches_the_device():
    m, _ = _run_steps(budget=700, probe=True)
    others = [other for _, _, other in STEP]
    # Interval p holds the previous access's activations until its own compute changes them.
    want = [max(others[p - 1] if p else 0, others[p]) for p in range(len(STEP))]
    want[-1] = max(want[-1], 0)  # before the first access nothing else was on the device
    assert m.nonmodel == want
    assert m.report()["nonmodel_peak_bytes"] == 300
    n = len(STEP)
    near = [max(want[(p + d) % n] for d in (-1, 0, 1)) for p in range(n)]
    assert m.room == [700 - x - math.ceil(x * MARGIN) for x in near]


def test_managed_plus_nonmodel_stay_under_budget():
    budget = 700
    m, totals = _run_steps(budget, probe=True)
    assert max(totals) <= budget and m.peak <= budget
    assert m.evictions > 0
    # Room for three payloads (less transient) in the "forward"; payload 0 returns for the
    # optimizer, whose room is larger, but loading it one position early would not fit the
    # backward's room, so it is loaded on demand each step, never ahead (plus once at the
    # first access after the warm-up, which left it on the host).
    assert m.room[5] - m.transient_peak[5] == 3 * PAYLOAD + 20
    assert m.counts["demand_loads"] == 3 and m.counts["prefetch_loads"] == 0
    # Without the probe the manager fills the budget with payloads and the activations overshoot.
    _, blind = _run_steps(budget, probe=False)
    assert max(blind) > budget


TRACE = [0, 1, 2, 3, 2, 1, 0]  # one step's payload accesses; the budget holds two payloads


def _belady_run(prefetch_bytes: int) -> tuple[MemoryManager, list, list]:
    moves: list = []
    move = lambda c, d: moves.append((c, d))  # noqa: E731
    m = MemoryManager(CPU, 250, move, [100] * 4, prefetch_bytes=prefetch_bytes)
    m.place_initial()
    states = []
    for s in range(3):
        if s == 1:
            moves.clear()
        for cid in TRACE:
            m.touch(cid)
            if s > 0:
                states.append((sorted(m.resident), sorted(m.prefetched)))
        m.end_step()
    return m, moves, states


def test_prefetch_moves_demand_loads_earlier_without_adding_any():
    on_demand, moves_ref, _ = _belady_run(0)
    ahead, moves, states = _belady_run(10**6)
    assert moves == moves_ref  # the same transfers in the same order, only earlier
    assert on_demand.counts["demand_loads"] == 4 and on_demand.counts["prefetch_hits"] == 0
    assert ahead.counts["demand_loads"] == 0
    assert ahead.counts["prefetch_loads"] == ahead.counts["prefetch_hits"] == 4
    assert ahead.counts["prefetch_wasted"] == 0
    # Touching 1 (position 1) loads 2 ahead for position 2: 2 is used again at 4, before 0
    # (at 6), so 0 goes. Touching 1 at position 5 loads 0 ahead, evicting 2 (used next step).
    assert states[1] == ([1, 2], [2]) and states[5] == ([0, 1], [0])
    # 3 is never loaded: its next use (next step) is later than both residents' (Belady).
    assert all(3 not in resident for resident, _ in states)
    assert ahead.counts["host_accesses"] == on_demand.counts["host_accesses"] == 2


def test_prefetch_window_and_wasted_loads():
    one, _, states = _belady_run(150)  # room in the window for the next payload only
    assert one.counts["prefetch_hits"] == 4 and one.counts["demand_loads"] == 0
    less, _, _ = _belady_run(50)  # smaller than one payload: nothing is loaded ahead
    assert less.counts["prefetch_loads"] == 0 and less.counts["demand_loads"] == 4
    # A payload loaded ahead and evicted before its use is counted as wasted.
    m, _, _ = _belady_run(10**6)
    m.pos = 0
    m.touch(0)  # next step, position 0
    m.touch(1)  # position 1: loads 2 ahead, evicting 0
    assert sorted(m.resident) == [1, 2] and m.prefetched == {2}
    m.alloc(200)  # a gathered chunk needs both payloads' room: 1 (used at 5), then 2 (at 2)
    assert m.resident == {} and m.counts["prefetch_wasted"] == 1
    m.free(200)


def test_side_stream_orders_consumers_after_each_load(monkeypatch):
    """The CUDA calls, recorded through stand-ins: the move runs inside the side stream, an
    event is recorded on it after, and a consumer waits on that event exactly once."""
    log: list = []

    class Event:
        def record(self, stream: str) -> None:
            log.append(("record", stream, self))

    class Main:
        def wait_event(self, event: Event) -> None:
            log.append(("wait", event))

    @contextmanager
    def stream(s: str):
        log.append(("enter", s))
        yield
        log.append(("exit", s))

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: "side")
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Main())
    side = SideStream(torch.device("cuda"), lambda cid, to_device: log.append(("move", cid)))
    side.load(3)
    side.load(5)
    event3, event5 = log[3][2], log[7][2]
    one_load = [("enter", "side"), ("move", 0), ("exit", "side"), ("record", "side")]
    want = [("move", cid) if e[0] == "move" else e for cid in (3, 5) for e in one_load]
    assert [e[:2] for e in log] == want
    del log[:]
    side.ready(3)
    side.ready(3)  # already waited for: nothing more
    side.settle()
    assert log == [("wait", event3), ("wait", event5)] and side.pending == {}


STEPS = 4
CHUNK_MB = 0.02
BUDGET_MB = 0.35  # evicts every step (as in test_engine_partition)
MODES = {
    "on_demand": {"chunk_mb": CHUNK_MB, "device_budget_mb": BUDGET_MB, "prefetch_mb": 0.0},
    "prefetch": {"chunk_mb": CHUNK_MB, "device_budget_mb": BUDGET_MB, "prefetch_mb": 1.0},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ranks = run_engine(tmp_path_factory.mktemp("prefetch"), world=2, steps=STEPS, modes=MODES)
    return ranks, reference_losses(run_config(), world=2, steps=STEPS)


def test_two_ranks_prefetch_exact_and_loads_ahead(runs):
    ranks, ref = runs
    for r in ranks:
        for mode in MODES:
            assert r[mode]["losses"] == pytest.approx(ref, rel=1e-5)
            report = r[mode]["report"]
            assert 0 < report["peak_device_bytes"] <= report["budget_bytes"]
            assert all(n > 0 for n in r[mode]["evictions"])
        demand, ahead = r["on_demand"]["report"], r["prefetch"]["report"]
        assert demand["demand_loads"] > 0 and demand["prefetch_hits"] == 0
        assert ahead["demand_loads"] < demand["demand_loads"]
        assert ahead["loads"] <= demand["loads"]  # earlier, not more
        assert ahead["prefetch_hits"] > 0
        assert ahead["prefetch_hits"] + ahead["prefetch_wasted"] <= ahead["prefetch_loads"]


def test_engine_with_traced_nonmodel_memory():
    """One process with a fake probe: 0.1 MB of other device memory and the 1 MiB margin floor
    shrink the payloads' room; losses stay exact and managed bytes stay under the budget less
    that memory and margin."""
    cfg = run_config()
    model = build_model(cfg)
    engine = apply_engine(model, Comm(), chunk_mb=CHUNK_MB, device_budget_mb=1.6)
    other = 100_000
    m = engine.manager
    m.probe = lambda: (m.used + other, m.used + other)
    m.margin_floor = MARGIN_FLOOR  # as with a real probe (apply gave none on the CPU)
    step_fn = make_step(model, cfg, engine)
    losses = [step_fn(batches(s, 1)).loss for s in range(STEPS)]
    assert losses == pytest.approx(reference_losses(cfg, world=1, steps=STEPS), rel=1e-5)
    report = engine.report()
    assert report["nonmodel_peak_bytes"] == other
    assert report["peak_device_bytes"] <= report["budget_bytes"] - other - MARGIN_FLOOR
    assert report["evictions"] > 0 and report["prefetch_hits"] > 0
