"""The memory manager alone: budget accounting, warm-up trace, furthest-next-use eviction."""

from __future__ import annotations

import pytest
import torch

from myriad.engine.placement import MemoryManager
from myriad.errors import UserError

TRACE = [0, 1, 2, 3, 2, 1, 0]  # one step's payload accesses


def _manager(budget: int, moves: list) -> MemoryManager:
    m = MemoryManager(
        torch.device("cpu"), budget, lambda cid, dev: moves.append((cid, dev)), [100] * 4
    )
    m.place_initial()
    return m


def _step(m: MemoryManager, budget: int) -> None:
    for cid in TRACE:
        m.touch(cid)
        assert m.used <= budget
    m.end_step()


def test_unlimited_budget_keeps_everything_on_device():
    moves: list = []
    m = _manager(0, moves)
    assert moves == [] and m.used == 400  # made on the device: no copies
    m.alloc(10**6)  # no budget: anything fits
    m.free(10**6)
    _step(m, 10**9)
    assert m.evictions == 0 and len(m.resident) == 4


def test_belady_after_warm_up():
    moves: list = []
    m = _manager(250, moves)  # room for two payloads
    assert moves == [(c, False) for c in range(4)] and m.used == 0
    _step(m, 250)  # warm-up: least recently used
    assert m.trace == TRACE and not m.tracing
    assert m.peak <= 250 and m.evictions > 0
    # Steady state: set a known residency and position, then check each decision.
    m.resident = {0: 0, 3: 0}
    m.payload_used, m.pos = 200, 3  # next uses: 3 at position 3 (distance 0), 0 at 6 (3)
    m.alloc(100)  # a gathered chunk needs room: evict the payload needed furthest ahead (0)
    assert list(m.resident) == [3] and moves[-1] == (0, False) and m.used == 200
    m.free(100)
    # Touching a payload whose next use is later than every resident's does not load it.
    m.resident, m.payload_used, m.pos = {1: 0, 2: 0}, 200, 1  # 1 next at 1 (0), 2 at 2 (1)
    m.touch(0)  # pos becomes 2; 0 next at 6 (distance 4) is later than 1 (3) and 2 (0): host
    assert set(m.resident) == {1, 2} and m.counts["host_accesses"] == 1


def test_budget_too_small_for_chunks_in_use():
    m = _manager(250, [])
    m.alloc(200)
    with pytest.raises(UserError, match="engine.device_budget_mb"):
        m.alloc(100)


def test_payload_in_use_goes_home_when_nothing_else_frees_room():
    moves: list = []
    m = _manager(250, moves)
    m.touch(0)  # warm-up: loaded, it fits
    assert m.resident.keys() == {0} and m.used == 100
    m.alloc(200, keep=0)  # its gathered chunk: only sending payload 0 home makes room
    assert m.resident == {} and moves[-1] == (0, False) and m.used == 200
    m.free(200)
