"""The trainer with ``engine.kind = "myriad"``: same losses and weights as ``none``, and resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import tiny_config, use_fake_data

from myriad.cli import main
from myriad.engine.config import EngineConfig
from myriad.errors import UserError
from myriad.train import load_model_from_checkpoint, run_pretrain
from myriad.train.checkpoint import read_checkpoint_info
from myriad.train.metrics import read_metrics

ENGINE = EngineConfig(kind="myriad", chunk_mb=0.02, device_budget_mb=0.5)
FSDP2 = {  # expert parallelism: over all ranks, and in groups of 2 (4 ranks)
    "fsdp2": EngineConfig(kind="fsdp2"),
    "fsdp2-ep": EngineConfig(kind="fsdp2", expert_parallel=True),
    "fsdp2-ep2": EngineConfig(kind="fsdp2", expert_parallel=True, expert_parallel_size=2),
}


def _quiet(_line):
    pass


def _config(engine: EngineConfig | None = None):
    cfg = tiny_config(steps=6, eval_every=3, checkpoint_every=3)
    return dataclasses.replace(cfg, engine=engine or EngineConfig())


def _losses(path, kind="train", key="loss"):
    return [r[key] for r in read_metrics(path) if r["kind"] == kind]


def test_myriad_engine_matches_no_engine(tmp_path, monkeypatch):
    use_fake_data(monkeypatch)
    plain = run_pretrain(_config(), tmp_path / "none", log=_quiet)
    chunked = run_pretrain(_config(ENGINE), tmp_path / "myriad", log=_quiet)
    assert _losses(chunked.metrics_path) == pytest.approx(_losses(plain.metrics_path), rel=1e-5)
    held = _losses(chunked.metrics_path, "heldout", "heldout_loss")
    assert held == pytest.approx(_losses(plain.metrics_path, "heldout", "heldout_loss"), rel=1e-5)
    a, _ = load_model_from_checkpoint(plain.checkpoint)
    b, _ = load_model_from_checkpoint(chunked.checkpoint)  # whole weights, loadable without engine
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_myriad_engine_resume_is_exact(tmp_path, monkeypatch, overlap, one_thread):
    """``on``: checkpoints wait for the overlapped updates (test_engine_overlap.py)."""
    from myriad.engine.overlap import UpdateWorker

    engine = dataclasses.replace(ENGINE, overlap_step=overlap)
    submitted = []
    real_submit = UpdateWorker.submit
    monkeypatch.setattr(
        UpdateWorker, "submit", lambda self, *a: (submitted.append(a[0]), real_submit(self, *a))
    )
    use_fake_data(monkeypatch)
    full = run_pretrain(_config(engine), tmp_path / "full", log=_quiet)
    use_fake_data(monkeypatch, fail_at=4)  # stops during step 5, after the step-3 checkpoint
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(_config(engine), tmp_path / "cut", log=_quiet)
    use_fake_data(monkeypatch)
    resumed = run_pretrain(_config(engine), tmp_path / "cut", resume=True, log=_quiet)
    assert _losses(resumed.metrics_path) == _losses(full.metrics_path)
    assert bool(submitted) == (overlap == "on")
    if overlap == "on":
        serial = run_pretrain(_config(ENGINE), tmp_path / "serial", log=_quiet)
        assert _losses(full.metrics_path) == _losses(serial.metrics_path)


def _pretrain_rank(
    rank: int, world: int, port: int, out: str, kind: str, recompute: bool = False
) -> None:
    """One ``torchrun``-style rank: the environment torchrun sets, then ``run_pretrain``
    (``recompute``: with activation checkpointing)."""
    from test_engine_support import torchrun_env
    from test_train_support import FakePrepared

    import myriad.data

    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    myriad.data.prepare_data = lambda cfg, **kw: FakePrepared(kw["out_dir"])  # type: ignore
    engine = dataclasses.replace(ENGINE, device_budget_mb=0.35, expert_parallel=True)
    if kind.startswith("fsdp2"):
        engine = FSDP2[kind]
    cfg = _config(engine)
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=recompute)
    )
    run_pretrain(cfg, tmp_path_of(out), log=_quiet)


def tmp_path_of(out: str):
    from pathlib import Path

    return Path(out) / "run"


@pytest.mark.parametrize(
    ("kind", "recompute"),
    [("myriad", False), ("fsdp2", False), ("fsdp2-ep", False), ("myriad", True), ("fsdp2", True)],
    ids=["myriad", "fsdp2", "fsdp2-ep", "myriad-recompute", "fsdp2-recompute"],
)
def test_two_ranks_through_run_pretrain(tmp_path, kind, recompute):
    """Rank 0 logs the rank-mean losses of the reference that takes both ranks' streams as two
    micro-batches. Both kinds write one shared, sharded checkpoint (``myriad``:
    ``test_engine_trainer_shards.py``; ``fsdp2``: ``dcp/``, whose weights load and export in
    one process). ``myriad`` runs with partitioning, expert parallelism and offload
    together; ``fsdp2`` is PyTorch's, ``fsdp2-ep`` with expert parallelism. ``recompute``:
    with activation checkpointing, whose recomputed blocks gather their chunks again in the
    backward."""
    from test_engine_support import pretrain_reference, spawn

    spawn(_pretrain_rank, 2, str(tmp_path), kind, recompute)
    run = tmp_path / "run"
    model, ref = pretrain_reference(_config(), (2,) * 6)
    assert _losses(run / "metrics.jsonl") == pytest.approx(ref, rel=1e-5)
    assert _losses(run / "rank-1" / "metrics.jsonl") == _losses(run / "metrics.jsonl")
    assert not (run / "rank-1" / "checkpoints").exists()
    if kind == "myriad" or recompute:  # the shard files: test_engine_trainer_shards.py
        return
    step = run / "checkpoints" / "step-000006"
    names = {p.name for p in step.iterdir()}
    assert {"dcp", "trainer_state-rank0.pt", "trainer_state-rank1.pt"} <= names
    assert "model.safetensors" not in names  # the weights are in dcp/ only
    loaded, _ = load_model_from_checkpoint(run)  # assembled from dcp/ = the reference's
    ref_weights = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-4, atol=1e-6, msg=name)
    exported = tmp_path / "export.safetensors"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    tensors = load_file(exported)
    state = loaded.state_dict()
    aliases = set(dict(loaded.named_parameters(remove_duplicate=False))) - set(
        dict(loaded.named_parameters())
    )  # tied parameters are stored once
    assert set(tensors) == set(state) - aliases
    for name, value in tensors.items():
        assert torch.equal(value, state[name]), name
    numel = sum(t.numel() for t in tensors.values())
    assert read_checkpoint_info(run)["weights"]["parameters"] == numel


def _resume_rank(rank: int, world: int, port: int, out: str) -> None:
    """One ``torchrun``-style rank: a full fsdp2 run, one stopped during step 5, then its resume."""
    from pathlib import Path

    from test_engine_support import torchrun_env
    from test_train_support import FakePrepared

    import myriad.data

    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    cfg = _config(EngineConfig(kind="fsdp2"))
    for name, fail_at, resume in (("full", None, False), ("cut", 4, False), ("cut", None, True)):
        myriad.data.prepare_data = lambda cfg, f=fail_at, **kw: FakePrepared(kw["out_dir"], f)  # type: ignore
        try:
            run_pretrain(cfg, Path(out) / name, resume=resume, log=_quiet)
        except KeyboardInterrupt:  # the simulated stop, on every rank at the same batch
            assert fail_at is not None


def test_fsdp2_resume_is_exact(tmp_path):
    """An fsdp2 run resumed from its step-3 checkpoint (optimizer state of DTensors) logs the
    uninterrupted run's losses, bit for bit, on both ranks."""
    from test_engine_support import spawn

    spawn(_resume_rank, 2, str(tmp_path))
    for rank_dir in ("", "rank-1"):
        full = _losses(tmp_path / "full" / rank_dir / "metrics.jsonl")
        assert len(full) == 6
        assert _losses(tmp_path / "cut" / rank_dir / "metrics.jsonl") == full


def _resume_on(rank: int, world: int, port: int, out: str, steps: int, kind: str = "fsdp2") -> None:
    """An fsdp2 ``--resume`` to ``steps``; a ``UserError`` goes to ``error-rankR.txt``."""
    from pathlib import Path

    from test_engine_support import torchrun_env
    from test_train_support import FakePrepared

    import myriad.data
    from myriad.errors import UserError

    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    myriad.data.prepare_data = lambda cfg, **kw: FakePrepared(kw["out_dir"])  # type: ignore
    cfg = _config(FSDP2[kind])
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    try:
        run_pretrain(cfg, Path(out), resume=True, log=_quiet)
    except UserError as exc:
        (Path(out) / f"error-rank{rank}.txt").write_text(str(exc), encoding="utf-8")


def test_fsdp2_resumes_on_another_number_of_ranks(tmp_path):
    """2 fsdp2 ranks to step 3, then 1 rank to step 6 (``torch.distributed.checkpoint`` reshards
    parameters and Adam moments) = one process taking 2, then 1, micro-batches per step."""
    from test_engine_support import spawn

    run = _check_resume_elsewhere(tmp_path, ("fsdp2", 2), ("fsdp2", 1))
    dcp_dir = run / "checkpoints" / "step-000006" / "dcp"
    shard = next(dcp_dir.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # a damaged shard file: a one-line error
    spawn(_resume_on, 1, str(run), 8)
    message = (run / "error-rank0.txt").read_text(encoding="utf-8")
    assert message.startswith(f"cannot read the checkpoint files in {dcp_dir}")
    assert len(message.splitlines()) == 1
    with pytest.raises(UserError, match=f"cannot read .* from {dcp_dir}"):
        load_model_from_checkpoint(run)  # the same damage, read in one process
    (dcp_dir / ".metadata").write_bytes(b"garbage")
    with pytest.raises(UserError, match=f"cannot read the checkpoint files in {dcp_dir}"):
        read_checkpoint_info(run)


def test_fsdp2_expert_parallel_resumes_with_another_layout(tmp_path):
    """4 fsdp2 ranks, experts in EP groups of 2 (each layer's experts sharded over 2 EDP ranks),
    to step 3, then 2 ranks with EP over both (EDP of 1) to step 6: the same losses and weights
    as one process taking 4, then 2, micro-batches per step (each expert written once, as part
    of its whole tensor, and resharded on reading)."""
    _check_resume_elsewhere(tmp_path, ("fsdp2-ep2", 4), ("fsdp2-ep", 2))


def _check_resume_elsewhere(tmp_path, first: tuple[str, int], then: tuple[str, int]):
    """(kind, ranks) ``first`` to step 3, resumed as ``then`` to step 6: losses and weights =
    one process taking the ranks' batches as micro-batches. Returns the run directory."""
    from test_engine_support import pretrain_reference, rewind, spawn

    (kind, world), (resume_kind, resume_world) = first, then
    spawn(_pretrain_rank, world, str(tmp_path), kind)
    run = rewind(tmp_path / "run", "step-000003")
    spawn(_resume_on, resume_world, str(run), 6, resume_kind)
    assert not (run / "error-rank0.txt").exists()
    model, ref = pretrain_reference(_config(), (world,) * 3 + (resume_world,) * 3)
    assert _losses(run / "metrics.jsonl") == pytest.approx(ref, rel=1e-5)
    loaded, _ = load_model_from_checkpoint(run)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=1e-4, atol=1e-6)
    return run
