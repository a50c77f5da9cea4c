"""Expert-parallel groups smaller than the world (``engine.expert_parallel_size``), gloo on CPU.

World 4 with EP size 2 (EP groups {0,1} and {2,3}, expert data-parallel groups {0,2} and {1,3}),
world 4 with EP = world, and world 2 with EP size 1: each gives the single-process reference's
losses and gradient norms (relative 1e-5) over 4 steps, the N ranks' batches being its N
micro-batches; also under an evicting offload budget, and with one EP group whose tokens all
avoid the experts of its second rank (that rank receives no rows, two experts get no tokens in
that group: nothing hangs, and the numbers still match a reference routed the same way).
Shards saved at world 4 / EP 2 reload bit-identically at world 1 and at world 2 (EP 2 and 1).
One spawn of 4 ranks runs it all (process start-up dominates the time): the world-2 runs use
ranks 0 and 1 as a subgroup.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_engine_support import (
    apply_engine,
    batches,
    build_model,
    init_rank,
    make_step,
    run_config,
    spawn,
)

from myriad.engine.comm import Comm
from myriad.engine.config import EngineConfig
from myriad.engine.groups import resolve_size
from myriad.engine.shards import ShardReader, load_shards, save_shards
from myriad.errors import UserError
from myriad.train.checkpoint import export_weights

STEPS = 4
CHUNK_MB = 0.02  # 5,120 fp32 elements: several chunks, expert chunks of their own
BUDGET_MB = 0.2  # fits the chunks in use plus a few payloads: evicts every step
EP2 = {"chunk_mb": CHUNK_MB, "expert_parallel": True, "expert_parallel_size": 2}
FOUR = {
    "ep2": (EP2, {"save": True}),
    "ep2_offload": ({**EP2, "device_budget_mb": BUDGET_MB}, {}),
    "ep2_starved": (EP2, {"starve": True}),
    "ep_world": ({"chunk_mb": CHUNK_MB, "expert_parallel": True}, {}),
}
TWO = {"ep1": ({"chunk_mb": CHUNK_MB, "expert_parallel": True, "expert_parallel_size": 1}, {})}
STARVED_RANKS = (0, 1)  # EP group 0: its tokens avoid experts 2, 3 (held by its rank 1)


def starve(model: Any, rank_of_call: Any) -> None:
    """Around each forward of a rank in ``STARVED_RANKS``, push experts 2 and 3 out of every
    router's top-k (a selection-bias offset, restored exactly after the forward).

    ``rank_of_call(i)`` names the rank whose batch the i-th forward is: the rank itself in the
    engine, the micro-batch index in the reference.
    """
    routers = [b.ffn.router for b in model.blocks if getattr(b.ffn, "router", None) is not None]
    calls, saved = [0], []

    def pre(_module: Any, _args: Any) -> None:
        starved = rank_of_call(calls[0]) in STARVED_RANKS
        calls[0] += 1
        saved[:] = [r.selection_bias_E.clone() for r in routers]
        if starved:
            for r in routers:
                r.selection_bias_E[2:] -= 10.0

    def post(_module: Any, _args: Any, _out: Any) -> None:
        for r, b in zip(routers, saved, strict=True):
            r.selection_bias_E.copy_(b)

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)


def reference(world: int, starved: bool = False) -> dict[str, list[float]]:
    """One process, the ``world`` ranks' batches as micro-batches: losses and gradient norms."""
    cfg = run_config()
    model = build_model(cfg)
    if starved:
        starve(model, lambda i: i % world)
    step_fn = make_step(model, cfg, None)
    out: dict[str, list[float]] = {"losses": [], "grad_norms": []}
    for s in range(STEPS):
        m = step_fn(batches(s, world))
        out["losses"].append(m.loss)
        out["grad_norms"].append(m.grad_norm)
    return out


def _train(rank: int, world: int, comm: Comm, engine_kw: dict, opts: dict, out: Path) -> dict:
    cfg = run_config()
    model = build_model(cfg)
    engine = apply_engine(model, comm, **engine_kw)
    if opts.get("starve"):
        starve(model, lambda _i: rank)
    step_fn = make_step(model, cfg, engine)
    result: dict[str, Any] = {"losses": [], "grad_norms": [], "evictions": []}
    for s in range(STEPS):
        before = engine.manager.evictions
        m = step_fn([batches(s, world)[rank]])
        result["losses"].append(m.loss)
        result["grad_norms"].append(m.grad_norm)
        result["evictions"].append(engine.manager.evictions - before)
    result["report"] = engine.report()
    if opts.get("save"):
        save_shards(engine, out / "shards")
        full = engine.full_state_dict()
        if rank == 0:
            torch.save(full, out / "full.pt")
    return result


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """The world-4 modes; then ranks 0 and 1, as a world of 2 (a subgroup), run ``TWO``."""
    comm = init_rank(rank, world, port)
    results = {name: _train(rank, world, comm, kw, o, Path(out)) for name, (kw, o) in FOUR.items()}
    comm.barrier()  # every rank's shards are written
    pair = dist.new_group([0, 1])
    if rank < 2:
        results.update(_two(rank, Comm(rank, 2, pair, comm.timeout_s), Path(out)))
    torch.save(results, Path(out) / f"rank{rank}.pt")
    comm.barrier()
    dist.destroy_process_group()


def _two(rank: int, comm: Comm, out: Path) -> dict[str, Any]:
    """EP size 1 training on 2 ranks, then the world-4 shards reloaded at EP size 2 and 1."""
    results: dict[str, Any] = {
        name: _train(rank, 2, comm, kw, o, out / "two") for name, (kw, o) in TWO.items()
    }
    for size in (2, 1):
        cfg = run_config()
        model = build_model(cfg)
        kw = {"chunk_mb": 0.05, "expert_parallel": True, "expert_parallel_size": size}
        engine = apply_engine(model, comm, **kw)
        make_step(model, cfg, engine)  # the optimizer, so the moments load too
        load_shards(engine, out / "shards")
        results[f"reload_ep{size}"] = engine.full_state_dict()
    return results


@pytest.fixture(scope="module")
def ref4():
    return reference(world=4)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    spawn(_worker, 4, str(out))
    return out, [torch.load(out / f"rank{r}.pt") for r in range(4)]


@pytest.fixture(scope="module")
def two(four):
    return four[1][:2]


@pytest.mark.parametrize("mode", ["ep2", "ep2_offload", "ep_world"])
def test_four_ranks_match_single_process(four, ref4, mode):
    ref = ref4
    assert ref["losses"][-1] < ref["losses"][0]
    for r in four[1]:
        assert r[mode]["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert r[mode]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
        assert r[mode]["report"]["expert_parallel_size"] == (4 if mode == "ep_world" else 2)


def test_offload_budget_respected_and_evicting(four):
    for r in four[1]:
        report = r["ep2_offload"]["report"]
        assert 0 < report["peak_device_bytes"] <= report["budget_bytes"]
        assert all(n > 0 for n in r["ep2_offload"]["evictions"]), r["ep2_offload"]["evictions"]


def test_rank_without_rows_neither_hangs_nor_drifts(four):
    ref = reference(world=4, starved=True)
    for r in four[1]:
        assert r["ep2_starved"]["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert r["ep2_starved"]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)


def test_two_ranks_ep_size_one_match_single_process(two):
    ref = reference(world=2)
    for r in two:
        assert r["ep1"]["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert r["ep1"]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
        assert r["ep1"]["report"]["expert_parallel_size"] == 0  # nothing split


def test_shard_layout_partitions_experts_within_their_group(four):
    shards = four[0] / "shards"
    for rank in range(4):
        layout = json.loads((shards / f"engine-rank{rank:05d}-of-00004.json").read_text())
        assert layout["expert_parallel_size"] == 2
        experts = [c for c in layout["chunks"] if any(s["rows"] for s in c["slots"])]
        assert experts and all(c["ranks"] == [rank % 2, rank % 2 + 2] for c in experts)
        for c in experts:  # this rank's two of the four experts, each shard half the chunk
            assert {tuple(s["rows"]) for s in c["slots"]} == {(2 * (rank % 2), 4)}
            assert c["world"] == 2 and c["rank"] == rank // 2


def test_reload_at_world_two_is_bit_identical(four, two):
    full = torch.load(four[0] / "full.pt")
    for r in two:
        for size in (2, 1):
            again = r[f"reload_ep{size}"]
            assert again.keys() == full.keys()
            for name, tensor in full.items():
                assert torch.equal(again[name], tensor), (size, name)


def test_reload_and_export_at_world_one_are_bit_identical(four, tmp_path):
    out, _ = four
    full = torch.load(out / "full.pt")
    cfg = run_config()
    model = build_model(cfg)
    engine = apply_engine(model, Comm(), chunk_mb=0.05, expert_parallel=True)
    make_step(model, cfg, engine)
    load_shards(engine, out / "shards")
    again = engine.full_state_dict()
    for name, tensor in full.items():
        assert torch.equal(again[name], tensor), name
    four_ranks, one = ShardReader(out / "shards"), ShardReader(save_shards(engine, tmp_path).parent)
    assert one.step() == four_ranks.step() == float(STEPS)
    for name in full:
        for kind in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(one.full(name, kind), four_ranks.full(name, kind)), (name, kind)
    path = export_weights(out / "shards", tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    exported = load_file(str(path))
    for name, tensor in full.items():
        assert torch.equal(exported[name], tensor), name


def test_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match=r"engine.expert_parallel_size \(3\).*processes \(4\)"):
        resolve_size(3, 4, 8)
    with pytest.raises(UserError, match=r"engine.expert_parallel_size \(4\).*num_experts \(6\)"):
        resolve_size(0, 4, 6)
    with pytest.raises(UserError, match="must be >= 0"):
        EngineConfig(kind="myriad", expert_parallel=True, expert_parallel_size=-1).validate()
    with pytest.raises(UserError, match="needs engine.expert_parallel = true"):
        EngineConfig(kind="myriad", expert_parallel_size=2).validate()
    model = build_model(run_config())
    with pytest.raises(UserError, match=r"expert_parallel_size \(2\).*processes \(1\)"):
        apply_engine(model, Comm(), expert_parallel=True, expert_parallel_size=2)
    assert resolve_size(0, 4, 8) == 4 and resolve_size(2, 4, 8) == 2
