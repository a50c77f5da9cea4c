"""Sharded checkpoints: 2 ranks write their shards; 1 rank reloads them exactly; export streams
them into one safetensors file that a plain model loads."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model
from test_engine_support import (
    apply_engine,
    batches,
    build_model,
    init_rank,
    make_step,
    run_config,
    spawn,
)

from myriad.cli import main
from myriad.engine.comm import Comm
from myriad.engine.shards import ShardReader, load_shards, save_shards
from myriad.train.checkpoint import export_weights

TWO_RANKS = {"chunk_mb": 0.02, "expert_parallel": True}


def _train_and_save(rank: int, world: int, port: int, out: str) -> None:
    comm = init_rank(rank, world, port)
    cfg = run_config()
    model = build_model(cfg)
    engine = apply_engine(model, comm, **TWO_RANKS)
    step_fn = make_step(model, cfg, engine)
    for s in range(2):
        step_fn([batches(s, world)[rank]])
    save_shards(engine, Path(out) / "shards")
    full = engine.full_state_dict()
    if rank == 0:
        torch.save(full, Path(out) / "full.pt")
    dist.barrier()  # neither rank tears gloo down while the other may still use it
    dist.destroy_process_group()


def test_reshard_two_to_one_and_export(tmp_path, capsys):
    spawn(_train_and_save, 2, str(tmp_path))
    full = torch.load(tmp_path / "full.pt")
    shards = tmp_path / "shards"
    assert len(list(shards.glob("engine-rank*-of-00002.safetensors"))) == 2

    cfg = run_config()
    model = build_model(cfg)
    engine = apply_engine(model, Comm(), chunk_mb=0.05)  # another world size and chunk size
    make_step(model, cfg, engine)  # builds the optimizer, so the moments load too
    load_shards(engine, shards)
    again = engine.full_state_dict()
    assert again.keys() == full.keys()
    for name, tensor in full.items():
        assert torch.equal(again[name], tensor), name

    resaved = save_shards(engine, tmp_path / "one").parent
    two, one = ShardReader(shards), ShardReader(resaved)
    assert one.step() == two.step() == 2.0
    for name in full:
        for kind in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(one.full(name, kind), two.full(name, kind)), (name, kind)

    path = export_weights(shards, tmp_path / "export" / "model.safetensors")
    plain = build_model(cfg)
    with torch.no_grad():
        for p in plain.parameters():
            p.zero_()
    missing, unexpected = load_model(plain, str(path), strict=False)
    assert not unexpected and not missing
    for name, p in plain.named_parameters():
        assert torch.equal(p.detach(), full[name]), name

    cli_out = tmp_path / "cli.safetensors"
    assert main(["export", str(shards), "--out", str(cli_out)]) == 0
    assert cli_out.read_bytes() == path.read_bytes()
    assert main(["export", str(tmp_path), "--out", str(cli_out)]) == 2  # no shard files there
    blocked = cli_out / "model.safetensors"  # its folder is a file: a write error, one line
    capsys.readouterr()
    assert main(["export", str(shards), "--out", str(blocked)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"myriad: error: cannot write {blocked}") and len(err.splitlines()) == 1
    consolidated = tmp_path / "export"  # a step directory with whole weights
    assert main(["export", str(consolidated), "--out", str(cli_out)]) == 2
    assert "holds consolidated weights already" in capsys.readouterr().err
