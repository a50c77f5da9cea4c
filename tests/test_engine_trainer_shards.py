"""The trainer's sharded checkpoints (``engine.kind = "myriad"``), 2 gloo ranks through
``run_pretrain``: what a step directory holds, exact resume, a write that fails on one rank,
the single-process readers (weights, ``myriad info``, ``myriad export``, hot-start) against a
1-process reference, and resumes with another world size (1 and 4 ranks).

One spawn runs, on both ranks: an uninterrupted run (``full``); a run whose step-6 save fails
on rank 1 (``cut``: its shard write raises ``OSError``); and ``--resume`` of ``cut``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import tiny_config, use_fake_data

from myriad.engine.config import EngineConfig
from myriad.errors import UserError
from myriad.train import checkpoint, run_pretrain
from myriad.train.metrics import read_metrics

ENGINE = EngineConfig(kind="myriad", chunk_mb=0.02, device_budget_mb=0.35, expert_parallel=True)
STEP3, STEP6 = "step-000003", "step-000006"
SHARD_FILES = {
    f"engine-rank{r:05d}-of-00002.{ext}" for r in range(2) for ext in ("safetensors", "json")
}


def _quiet(_line):
    pass


def _config(engine: EngineConfig = ENGINE):
    cfg = tiny_config(steps=6, eval_every=3, checkpoint_every=3)
    return dataclasses.replace(cfg, engine=engine)


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(path) if r["kind"] == "train"]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One ``torchrun``-style rank: ``full``, then ``cut`` (fails at step 6), then its resume."""
    from test_engine_support import torchrun_env
    from test_train_support import FakePrepared

    import myriad.data
    from myriad.engine import shards
    from myriad.engine.engine import Engine

    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    myriad.data.prepare_data = lambda cfg, **kw: FakePrepared(kw["out_dir"])  # type: ignore

    def whole_model(self):
        raise AssertionError("a rank gathered the whole model")

    Engine.full_state_dict = whole_model  # type: ignore[method-assign]  # saves never gather
    root = Path(out)
    run_pretrain(_config(), root / "full", log=_quiet)

    real_save_file = shards.save_file

    def disk_full_on_rank1(tensors, path):
        if rank == 1 and STEP6 in str(path):
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, path)

    shards.save_file = disk_full_on_rank1  # type: ignore[assignment]
    try:
        run_pretrain(_config(), root / "cut", log=_quiet)
        error = "no error"
    except UserError as exc:
        error = str(exc)
    finally:
        shards.save_file = real_save_file  # type: ignore[assignment]
    ckpts = root / "cut" / "checkpoints"
    seen = {
        "error": error,
        "entries": sorted(p.name for p in ckpts.iterdir()),
        "latest": (ckpts / "latest").read_text().strip(),
    }
    (root / f"failure-rank{rank}.json").write_text(json.dumps(seen), encoding="utf-8")
    run_pretrain(_config(), root / "cut", resume=True, log=_quiet)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from test_engine_support import spawn

    root = tmp_path_factory.mktemp("shards")
    spawn(_rank, 2, str(root))
    return root


def test_step_directory_holds_every_ranks_shards_and_state(runs):
    ckpts = runs / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", STEP3, STEP6]
    assert (ckpts / "latest").read_text().strip() == STEP6
    names = {p.name for p in (ckpts / STEP6).iterdir()}
    ranks = {"trainer_state-rank0.pt", "trainer_state-rank1.pt"}
    assert names == SHARD_FILES | ranks | {"config.json", "trainer_state.json"}
    assert not (runs / "full" / "rank-1" / "checkpoints").exists()
    for r in range(2):  # each rank's own stream position; moments live in the shards
        state = checkpoint.load_state(ckpts / STEP6, f"trainer_state-rank{r}.pt")
        assert state["step"] == 6 and state["data_stream"] == {"position": 6}
        assert set(state["optimizer"]) == {"param_groups"}


def test_resume_after_a_failed_save_is_exact(runs):
    full, cut = runs / "full", runs / "cut"
    assert _losses(cut / "metrics.jsonl") == _losses(full / "metrics.jsonl")
    assert _losses(cut / "rank-1" / "metrics.jsonl") == _losses(full / "metrics.jsonl")
    a = checkpoint.read_shard_weights(full / "checkpoints" / STEP6)
    b = checkpoint.read_shard_weights(cut / "checkpoints" / STEP6)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for r in range(2):  # Adam moments restored: the next step's update is the same
        sa = load_file(full / "checkpoints" / STEP6 / f"engine-rank{r:05d}-of-00002.safetensors")
        sb = load_file(cut / "checkpoints" / STEP6 / f"engine-rank{r:05d}-of-00002.safetensors")
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_write_failure_on_one_rank_keeps_previous_checkpoint(runs):
    seen = [json.loads((runs / f"failure-rank{r}.json").read_text()) for r in range(2)]
    for s in seen:  # both ranks raised; only step 3 and its pointer, no temporary directory
        assert s["entries"] == ["latest", STEP3] and s["latest"] == STEP3
        assert len(s["error"].splitlines()) == 1
        assert f"could not save checkpoint {runs / 'cut' / 'checkpoints' / STEP6}" in s["error"]
        assert "rank 1 failed to write" in s["error"]
        assert "previous checkpoint is intact" in s["error"]
    assert "No space left on device" in seen[1]["error"]
    assert not (runs / "cut" / "rank-1" / "checkpoints").exists()
    for name in SHARD_FILES:  # step 3 untouched by the failed save (and the resume)
        full = (runs / "full" / "checkpoints" / STEP3 / name).read_bytes()
        assert (runs / "cut" / "checkpoints" / STEP3 / name).read_bytes() == full


def _reference_model(worlds=(2,) * 6):
    from test_engine_support import pretrain_reference

    return pretrain_reference(_config(), worlds)


def test_single_process_readers_match_reference(runs, tmp_path, capsys):
    from myriad.cli import main
    from myriad.model import MoETransformerLM
    from myriad.train import hotstart, load_model_from_checkpoint

    step_dir = runs / "full" / "checkpoints" / STEP6
    ref, ref_losses = _reference_model()
    assert _losses(runs / "full" / "metrics.jsonl") == pytest.approx(ref_losses, rel=1e-5)
    loaded, _ = load_model_from_checkpoint(runs / "full")  # assembled from the shards
    want = ref.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)

    assert main(["export", str(step_dir), "--out", str(tmp_path / "m.safetensors")]) == 0
    exported = load_file(tmp_path / "m.safetensors")
    canonical = {p: n for n, p in loaded.named_parameters()}  # tied tensors are stored once
    first = {n: canonical[p] for n, p in loaded.named_parameters(remove_duplicate=False)}
    assert set(exported) == {first.get(n, n) for n in got}
    for name, value in got.items():  # bit-for-bit the weights the readers assemble
        assert torch.equal(exported[first.get(name, name)], value), name
    assert main(["export", str(runs / "full"), "--out", str(tmp_path / "r.safetensors")]) == 0
    from_run = load_file(tmp_path / "r.safetensors")  # a run directory exports its latest step
    assert from_run.keys() == exported.keys()
    assert all(torch.equal(from_run[k], v) for k, v in exported.items())

    cfg = _config(EngineConfig())
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(step_dir)))
    fresh = MoETransformerLM(cfg.model)
    assert hotstart.init_from_checkpoint(fresh, cfg) == "load"
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, got[name]), name

    capsys.readouterr()
    assert main(["info", str(step_dir)]) == 0
    out = capsys.readouterr().out
    assert "training state" in out and "tokens_seen" in out
    info = checkpoint.read_checkpoint_info(step_dir)
    assert info["step"] == 6
    n_params = sum(p.numel() for p in ref.parameters())  # tied embedding counted once
    n_buffers = sum(b.numel() for n, b in ref.named_buffers() if "selection_bias" in n)
    assert info["weights"]["parameters"] == n_params + n_buffers


def test_hot_start_into_the_engine_reads_only_its_own_slices(runs, monkeypatch):
    """``--init-from`` engine shards of the same model, into the engine: the weights are the
    shards' (bit for bit) and the source model is never assembled."""
    from test_engine_support import apply_engine

    from myriad.engine.comm import Comm
    from myriad.model import MoETransformerLM
    from myriad.train import hotstart

    step_dir = runs / "full" / "checkpoints" / STEP6
    cfg = _config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(step_dir)))
    model = MoETransformerLM(cfg.model)
    engine = apply_engine(model, Comm(), chunk_mb=0.05)  # another chunk size than the source's

    def assembled(*args, **kwargs):
        raise AssertionError("the source model was assembled")

    monkeypatch.setattr(checkpoint, "load_model_from_checkpoint", assembled)
    assert hotstart.init_from_checkpoint(model, cfg, engine) == "load"
    want = checkpoint.read_shard_weights(step_dir)
    got = engine.full_state_dict()
    for name, value in got.items():
        assert torch.equal(value, want[name]), name


def _copy_at_step3(runs: Path, name: str) -> Path:
    """A copy of the ``full`` run as it stood after its step-3 checkpoint."""
    import shutil

    from test_engine_support import rewind

    shutil.copytree(runs / "full", runs / name)
    return rewind(runs / name, STEP3)


def _resume_rank(rank: int, world: int, port: int, out: str) -> None:
    from test_engine_support import torchrun_env
    from test_train_support import FakePrepared

    import myriad.data

    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    myriad.data.prepare_data = lambda cfg, **kw: FakePrepared(kw["out_dir"])  # type: ignore
    run_pretrain(_config(), Path(out), resume=True, log=_quiet)


@pytest.mark.parametrize("world", [1, 4])
def test_resume_with_another_world_size_reshards(runs, world, monkeypatch):
    """2 ranks to step 3, then ``world`` ranks to step 6 (4: ranks 2 and 3 start at rank 0's
    data position, and the experts spread over 4 ranks instead of 2) against one process that
    takes 2, then ``world``, micro-batches per step: Adam moments and step counts survive."""
    from test_engine_support import spawn

    from myriad.train import load_model_from_checkpoint

    run = _copy_at_step3(runs, f"elastic-{world}")
    lines: list[str] = []
    if world == 1:
        use_fake_data(monkeypatch)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        run_pretrain(_config(), run, resume=True, log=lines.append)
        assert "resume: 2 process(es) wrote step-000003, 1 resume it" in lines[0]
    else:
        spawn(_resume_rank, world, str(run))
    ref, ref_losses = _reference_model((2, 2, 2, world, world, world))
    assert _losses(run / "metrics.jsonl") == pytest.approx(ref_losses, rel=1e-5)
    step6 = run / "checkpoints" / STEP6
    assert checkpoint.shard_world(step6) == world
    for r in range(world):  # every rank, added ones included, moved on from step 3's position
        state = checkpoint.load_state(step6, f"trainer_state-rank{r}.pt")
        assert state["step"] == 6 and state["data_stream"] == {"position": 6}
    loaded, _ = load_model_from_checkpoint(run)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=1e-4, atol=1e-6)


def test_consolidated_checkpoint_resumes_with_its_own_world_size_only(tmp_path, monkeypatch):
    """A consolidated checkpoint (one model.safetensors, one trainer state) written by 2
    processes: the sharded kinds cannot resume it on several ranks, nor any kind elsewhere."""
    from myriad.train.shard_checkpoint import check_resume

    (tmp_path / checkpoint.WEIGHTS).write_bytes(b"")
    checkpoint.write_json(tmp_path / checkpoint.STATE_JSON, {"step": 3, "processes": 2})
    monkeypatch.setenv("WORLD_SIZE", "2")
    for kind in ("myriad", "fsdp2"):
        with pytest.raises(UserError, match="holds consolidated weights.*--init-from"):
            check_resume(tmp_path, kind)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError) as caught:
        check_resume(tmp_path, "none")
    message = str(caught.value)
    assert "with 1 process(es): it was written by 2 as one consolidated checkpoint" in message
    assert "--init-from" in message and len(message.splitlines()) == 1
    checkpoint.write_json(tmp_path / checkpoint.STATE_JSON, {"step": 3, "processes": 1})
    assert check_resume(tmp_path, "none") is None


def test_damaged_shard_file_is_a_one_line_error(runs, tmp_path, capsys):
    import shutil

    from myriad.cli import main
    from myriad.train import load_model_from_checkpoint

    copy = tmp_path / STEP6
    shutil.copytree(runs / "full" / "checkpoints" / STEP6, copy)
    shard = copy / "engine-rank00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    assert main(["info", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt or truncated shard files" in err
    with pytest.raises(UserError, match=f"shard files in {copy}"):
        load_model_from_checkpoint(copy)
    shard.unlink()
    with pytest.raises(UserError, match="engine-rank00001-of-00002.safetensors"):
        load_model_from_checkpoint(copy)
