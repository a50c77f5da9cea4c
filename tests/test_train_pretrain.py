"""``run_pretrain`` end to end on a tiny model: metrics, plots, overwrite guard, exact resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import tiny_config, use_fake_data

from myriad.data.config import DataConfig
from myriad.errors import UserError
from myriad.train import load_model_from_checkpoint, read_checkpoint_info, run_pretrain
from myriad.train.metrics import read_metrics

# The row keys docs/training.md promises.
TRAIN_KEYS = (
    "kind",
    "step",
    "loss",
    "lm_loss",
    "load_balance_loss",
    "z_loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "elapsed",
    "expert_load_max_over_mean",
    "expert_load_max_over_mean_per_layer",
    "dropped_fraction",
)
HELDOUT_KEYS = ("kind", "step", "heldout_loss", "tokens", "elapsed") + (
    "expert_load_max_over_mean",  # MoE models only (train/routing_stats.py)
    "expert_load_max_over_mean_per_layer",
    "routing_churn",
    "routing_churn_per_layer",
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _quiet(_line):
    pass


def _losses(rows):
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_fresh_run_metrics_plots_checkpoints(tmp_path, monkeypatch):
    use_fake_data(monkeypatch)
    lines: list[str] = []
    cfg = tiny_config(steps=6, eval_every=2, checkpoint_every=3, grad_accum=2)
    result = run_pretrain(cfg, tmp_path / "run", log=lines.append)

    rows = read_metrics(result.metrics_path)
    train = [r for r in rows if r["kind"] == "train"]
    heldout = [r for r in rows if r["kind"] == "heldout"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in heldout] == [0, 2, 4, 6]  # step 0, every eval_every, the end
    assert all(set(r) == set(TRAIN_KEYS) for r in train)
    assert all(set(r) == set(HELDOUT_KEYS) for r in heldout)
    assert [r["tokens"] for r in train] == [2 * 4 * 16 * s for s in range(1, 7)]
    assert all(len(r["expert_load_max_over_mean_per_layer"]) == 2 for r in train)
    assert all(r["expert_load_max_over_mean"] >= 1.0 for r in train)
    assert result.first_heldout_loss == heldout[0]["heldout_loss"]
    assert result.final_heldout_loss == heldout[-1]["heldout_loss"] < result.first_heldout_loss
    assert result.final_train_loss == train[-1]["loss"]

    assert result.checkpoint.name == "step-000006"
    assert sorted(p.name for p in (result.out_dir / "checkpoints").glob("step-*")) == [
        "step-000003",
        "step-000006",
    ]
    info = read_checkpoint_info(result.out_dir)
    assert info["step"] == 6 and info["state"]["tokens_seen"] == 6 * 2 * 4 * 16
    assert json.loads((result.out_dir / "config.json").read_text())["train"]["grad_accum"] == 2
    assert [p.name for p in result.plot_paths] == ["loss.png", "expert_load.png"]
    for png in result.plot_paths:
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 2000
    assert any(p.name.startswith("events.") for p in (result.out_dir / "tensorboard").iterdir())
    assert any(line.startswith("params:") for line in lines)
    assert any(line.startswith("device: cpu (fp32)") for line in lines)


def test_refuses_to_overwrite_without_resume(tmp_path, monkeypatch):
    use_fake_data(monkeypatch)
    cfg = tiny_config(steps=1)
    run_pretrain(cfg, tmp_path, log=_quiet)
    with pytest.raises(UserError, match="already holds a run.*--resume.*--out"):
        run_pretrain(cfg, tmp_path, log=_quiet)
    with pytest.raises(UserError, match="no checkpoint"):
        run_pretrain(cfg, tmp_path / "empty", resume=True, log=_quiet)


def test_resume_refuses_changed_config(tmp_path, monkeypatch):
    use_fake_data(monkeypatch)
    cfg = tiny_config(steps=2)
    run_pretrain(cfg, tmp_path, log=_quiet)
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5))
    with pytest.raises(UserError, match=r"train\.lr: checkpoint 0\.003, now 0\.5"):
        run_pretrain(changed, tmp_path, resume=True, log=_quiet)


def test_failed_resume_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    """A damaged trainer state: a one-line error, and config.json and metrics keep the old run
    (not the resume's new ``train.steps``)."""
    use_fake_data(monkeypatch)
    cfg = tiny_config(steps=2)
    run_pretrain(cfg, tmp_path, log=_quiet)
    config, metrics = (tmp_path / "config.json").read_bytes(), (tmp_path / "metrics.jsonl")
    rows = metrics.read_bytes()
    state = tmp_path / "checkpoints" / "step-000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4))
    with pytest.raises(UserError, match=f"corrupt or truncated trainer state {state}"):
        run_pretrain(longer, tmp_path, resume=True, log=_quiet)
    assert (tmp_path / "config.json").read_bytes() == config
    assert metrics.read_bytes() == rows


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    cfg = tiny_config(steps=8, eval_every=2, checkpoint_every=3, grad_accum=2)
    use_fake_data(monkeypatch)
    straight = run_pretrain(cfg, tmp_path / "straight", log=_quiet)

    # Interrupted: the stream dies inside step 5 (its 9th micro-batch), after the step-3
    # checkpoint and after step 4's metrics were written; the resume must rewrite steps 4-5.
    use_fake_data(monkeypatch, fail_at=9)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(cfg, tmp_path / "stopped", log=_quiet)
    assert _losses(read_metrics(tmp_path / "stopped" / "metrics.jsonl"))[-1][0] == 4
    use_fake_data(monkeypatch)
    lines: list[str] = []
    resumed = run_pretrain(cfg, tmp_path / "stopped", resume=True, log=lines.append)
    assert any("step-000003" in line and "step 3" in line for line in lines)

    rows_a, rows_b = read_metrics(straight.metrics_path), read_metrics(resumed.metrics_path)
    assert _losses(rows_a) == _losses(rows_b)  # exact float equality, every step
    assert [r["step"] for r in rows_b if r["kind"] == "train"] == list(range(1, 9))
    assert [(r["step"], r["heldout_loss"]) for r in rows_a if r["kind"] == "heldout"] == [
        (r["step"], r["heldout_loss"]) for r in rows_b if r["kind"] == "heldout"
    ]
    assert resumed.first_heldout_loss == straight.first_heldout_loss
    weights_a = load_file(straight.checkpoint / "model.safetensors")
    weights_b = load_file(resumed.checkpoint / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    state_a = torch.load(straight.checkpoint / "trainer_state.pt", weights_only=True)
    state_b = torch.load(resumed.checkpoint / "trainer_state.pt", weights_only=True)
    assert torch.equal(state_a["expert_load_LE"], state_b["expert_load_LE"])
    assert torch.equal(state_a["rng"]["torch"], state_b["rng"]["torch"])


def test_real_data_pipeline(tmp_path):
    """One run through the real ``myriad.data.prepare_data`` on a slice of the built-in corpus."""
    data = pytest.importorskip("myriad.data")
    if not hasattr(data, "prepare_data"):
        pytest.skip("myriad.data.prepare_data is not available yet")
    cfg = tiny_config(steps=2, eval_every=1, checkpoint_every=0)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, objective="mlm", vocab_size=400),
        data=DataConfig(corpus="zh-news", seq_len=16, max_documents=60, heldout_fraction=0.1),
    )
    result = run_pretrain(cfg, tmp_path / "run", log=_quiet)
    assert result.tokenizer_path.is_file()
    assert result.first_heldout_loss is not None and result.final_heldout_loss is not None
    assert [r["step"] for r in read_metrics(result.metrics_path) if r["kind"] == "heldout"] == [
        0,
        1,
        2,
    ]
    model, loaded_cfg = load_model_from_checkpoint(result.out_dir)
    assert loaded_cfg == cfg and model.lm_head.weight is model.embed.weight
