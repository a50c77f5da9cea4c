"""Checkpoints: atomic under a crash, corrupt files are user errors, tied weights survive."""

from __future__ import annotations

import dataclasses
import errno
import json

import pytest
import torch
from test_engine_support import apply_engine, build_model, run_config
from test_train_support import tiny_config

from myriad.config import to_dict
from myriad.engine.comm import Comm
from myriad.engine.shards import save_shards
from myriad.errors import UserError
from myriad.model import MoETransformerLM
from myriad.train import checkpoint
from myriad.train.checkpoint import (
    latest_checkpoint,
    load_model_from_checkpoint,
    load_state,
    read_checkpoint_info,
    resolve_checkpoint,
    save_checkpoint,
)


def _save(root, step, model, cfg, keep=0):
    return save_checkpoint(
        root,
        step=step,
        model=model,
        config=to_dict(cfg),
        state={"step": step, "tensor": torch.arange(3)},
        summary={"step": step, "loss": 1.5},
        keep=keep,
    )


@pytest.fixture
def saved(tmp_path):
    cfg = tiny_config()
    model = MoETransformerLM(cfg.model)
    root = tmp_path / "run" / "checkpoints"
    return cfg, model, root, _save(root, 1, model, cfg)


def test_layout_and_latest_pointer(saved):
    cfg, model, root, step_dir = saved
    assert step_dir == root / "step-000001"
    names = {p.name for p in step_dir.iterdir()}
    assert names == {"model.safetensors", "config.json", "trainer_state.pt", "trainer_state.json"}
    assert (root / "latest").read_text().strip() == "step-000001"
    assert json.loads((step_dir / "config.json").read_text()) == to_dict(cfg)
    for path in (root.parent, root, step_dir):  # a run dir, a checkpoints dir or a step dir
        assert resolve_checkpoint(path) == step_dir
    # `myriad export RUN --out RUN/model.safetensors` leaves the run a run, not a step directory
    (root.parent / "model.safetensors").write_bytes((step_dir / "model.safetensors").read_bytes())
    assert resolve_checkpoint(root.parent) == step_dir
    info = read_checkpoint_info(root.parent)
    assert info["step"] == 1 and info["config"]["model"]["d_model"] == 32
    assert info["state"]["loss"] == 1.5
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    n_buffers = sum(b.numel() for n, b in model.named_buffers() if "selection_bias" in n)
    assert info["weights"]["parameters"] == n_params + n_buffers
    assert read_checkpoint_info(step_dir / "model.safetensors")["path"] == str(step_dir)


@pytest.mark.parametrize("victim", ["_write_state", "write_json"])
def test_crash_mid_save_keeps_previous_checkpoint(saved, monkeypatch, victim):
    cfg, model, root, step1 = saved
    before = (step1 / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # The weights file is written first, so it is complete when the second writer fails.
    monkeypatch.setattr(checkpoint, victim, disk_full)
    with pytest.raises(UserError, match="step-000002.*No space left on device"):
        _save(root, 2, model, cfg)

    assert not (root / "step-000002").exists()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]  # temp cleaned
    assert (root / "latest").read_text().strip() == "step-000001"
    assert (step1 / "model.safetensors").read_bytes() == before
    assert latest_checkpoint(root) == step1
    load_model_from_checkpoint(root.parent)  # still loads


def test_interrupt_between_rename_and_pointer_and_stale_temps(saved, monkeypatch):
    cfg, model, root, step1 = saved
    stale = root / ".tmp-step-000009-12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_latest", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 2, model, cfg)
    # The new directory is complete (renamed) but `latest` still names the old one.
    assert (root / "latest").read_text().strip() == "step-000001"
    assert not stale.exists()
    monkeypatch.undo()
    # Saving the same step again (a resumed run repeats it) replaces the directory cleanly.
    again = _save(root, 2, model, cfg)
    assert latest_checkpoint(root) == again and not list(root.glob(".tmp-*"))


def test_keep_last_n(saved):
    cfg, model, root, _ = saved
    for step in range(2, 6):
        _save(root, step, model, cfg, keep=2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000004", "step-000005"]


def test_truncated_weights_is_user_error_naming_file(saved):
    _, _, _, step_dir = saved
    path = step_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"model\.safetensors"):
        load_model_from_checkpoint(step_dir)
    with pytest.raises(UserError, match=r"truncated checkpoint weights .*model\.safetensors"):
        read_checkpoint_info(step_dir)  # `myriad info` checks the header, loads no tensors


def test_garbage_weights_is_user_error_naming_file(saved):
    _, _, _, step_dir = saved
    (step_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(
        UserError, match=r"corrupt or truncated checkpoint weights .*model\.safetensors"
    ):
        load_model_from_checkpoint(step_dir)


def test_truncated_trainer_state_is_user_error_naming_file(saved):
    _, _, _, step_dir = saved
    path = step_dir / "trainer_state.pt"
    assert load_state(step_dir)["step"] == 1
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match=r"trainer_state\.pt"):
        load_state(step_dir)


def test_missing_or_bad_json_is_user_error(saved, tmp_path):
    _, _, _, step_dir = saved
    (step_dir / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config\.json"):
        read_checkpoint_info(step_dir)
    (step_dir / "config.json").unlink()
    with pytest.raises(UserError, match=r"missing.*config\.json"):
        read_checkpoint_info(step_dir)
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_checkpoint(tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_survive_save_and_load(tmp_path, tied):
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tie_embeddings=tied))
    model = MoETransformerLM(cfg.model)
    with torch.no_grad():
        model.get_buffer("blocks.1.ffn.router.selection_bias_E").add_(0.5)  # buffers travel too
    step_dir = _save(tmp_path / "checkpoints", 3, model, cfg)

    loaded, loaded_cfg = load_model_from_checkpoint(step_dir)
    assert loaded_cfg == cfg
    assert (loaded.lm_head.weight is loaded.embed.weight) == tied
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    with torch.no_grad():  # still tied: one tensor, so an update to one is seen by the other
        loaded.embed.weight[0, 0] += 1.0
    assert torch.equal(loaded.lm_head.weight, loaded.embed.weight) == tied


def test_empty_trainer_state_names_the_error(saved):
    _, _, _, step_dir = saved
    (step_dir / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(UserError) as caught:
        load_state(step_dir)
    assert str(caught.value).endswith("trainer_state.pt: EOFError")  # not a bare "...: "


def test_export_never_replaces_an_existing_path(tmp_path):
    model = build_model(run_config())
    save_shards(apply_engine(model, Comm(), chunk_mb=0.05), tmp_path / "shards")
    taken = tmp_path / "model.safetensors"  # e.g. another run's consolidated weights
    taken.write_bytes(b"weights of another run")
    for out in (taken, tmp_path / "shards"):
        with pytest.raises(UserError, match=f"{out} already exists"):
            checkpoint.export_weights(tmp_path / "shards", out)
    assert taken.read_bytes() == b"weights of another run"
    assert checkpoint.export_weights(tmp_path / "shards", tmp_path / "new.safetensors").is_file()
