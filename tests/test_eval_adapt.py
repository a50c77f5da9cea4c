"""Task-adaptive pre-training (``myriad evaluate --suite ... --adapt-steps N``): it continues the
checkpoint's pre-training from its weights on the training texts only, is reused when finished,
and adds a NAME+tapt system to the suite, with its control: the same from random weights."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_eval_finetune import FAST, _checkpoint, _write_task

from myriad.cli import main
from myriad.config import to_dict
from myriad.eval import suite
from myriad.eval.adapt import adapt_checkpoint, training_texts
from myriad.eval.finetune import FinetuneConfig
from myriad.eval.tasks import load_task
from myriad.train import checkpoint, load_model_from_checkpoint
from myriad.train.checkpoint import save_checkpoint

STEPS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    return _checkpoint(root / "run"), load_task("jsonl", _write_task(root / "data"))


def test_adapted_run_continues_from_the_checkpoint_on_training_texts(tiny, tmp_path):
    run, task = tiny
    lines: list[str] = []
    out = adapt_checkpoint(task, "tiny", run, STEPS, tmp_path, lines.append)
    texts = (tmp_path / "adapt-jsonl-tiny" / "texts.txt").read_text(encoding="utf-8").splitlines()
    train = {ex.text_a for ex in task.splits["train"]}
    assert texts == training_texts(task) and set(texts) == train
    unseen = {ex.text_a for split in ("dev", "test") for ex in task.splits[split]} - train
    assert unseen and not unseen & set(texts)  # dev and test texts are never read
    assert checkpoint.read_checkpoint_info(out / "checkpoints" / "latest")["step"] == STEPS
    assert f"task-adaptive pre-training, {STEPS} steps" in lines[-1]

    source, _ = load_model_from_checkpoint(run)
    adapted, _ = load_model_from_checkpoint(out)
    for name, before in source.state_dict().items():
        after = adapted.state_dict()[name]
        if before.dim() < 2:
            continue
        cos = torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0)
        assert not torch.equal(after, before) and cos > 0.9, name  # moved, from the source

    assert adapt_checkpoint(task, "tiny", run, STEPS, tmp_path, lines.append) == out
    assert "reusing" in lines[-1]


def test_scratch_control_starts_from_random_weights_with_the_same_tokenizer(tiny, tmp_path):
    _, task = tiny
    run = _checkpoint(tmp_path / "src")  # then moved off the seeded initialisation
    model, cfg = load_model_from_checkpoint(run)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    save_checkpoint(
        run / "checkpoints", step=2, model=model, config=to_dict(cfg), state={}, summary={}
    )
    out = adapt_checkpoint(task, "ctl", run, STEPS, tmp_path, lambda _: None, scratch=True)
    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    assert checkpoint.read_checkpoint_info(out / "checkpoints" / "latest")["step"] == STEPS
    control, _ = load_model_from_checkpoint(out)
    for name, before in model.state_dict().items():
        after = control.state_dict()[name]
        if before.dim() >= 2:  # far from the checkpoint's weights: the shift is gone
            assert (after - before).mean().item() < -0.4, name
    warm = adapt_checkpoint(task, "ctl", run, STEPS, tmp_path, lambda _: None)
    assert warm == out  # the same name with other settings: trained again, from the checkpoint
    adapted, _ = load_model_from_checkpoint(warm)
    for name, before in model.state_dict().items():
        if before.dim() >= 2:
            assert abs((adapted.state_dict()[name] - before).mean().item()) < 0.1, name


def test_suite_adds_an_adapted_system(tiny, tmp_path, monkeypatch):
    run, task = tiny
    labelled = dataclasses.replace(  # a built-in task's test split has labels
        task, splits={**task.splits, "test": task.splits["dev"]}, test_labelled=True
    )
    monkeypatch.setitem(suite.SUITES, "tiny", ("jsonl",))
    monkeypatch.setattr(suite, "load_task", lambda name: labelled)
    cfg = suite.SuiteConfig(
        suite="tiny",
        checkpoints={"m": str(run)},
        seeds=(0,),
        work_dir=str(tmp_path / "work"),
        report=str(tmp_path / "report.md"),
        adapt_steps=STEPS,
    )
    suite.run_suite(cfg, FinetuneConfig(**FAST), log=lambda _: None)
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| m+tapt |" in report and "task-adaptive pre-training" in report
    tapt = json.loads((tmp_path / "work" / "jsonl-m+tapt-seed0" / "summary.json").read_text())
    assert tapt["checkpoint"] == str(tmp_path / "work" / "adapt-jsonl-m" / "run")
    assert "| scratch+tapt |" in report and "the control" in report
    control = tmp_path / "work" / "jsonl-scratch+tapt-seed0" / "summary.json"
    summary = json.loads(control.read_text())
    assert summary["checkpoint"] == str(tmp_path / "work" / "adapt-jsonl-scratch" / "run")


def test_cli_rejects_negative_adapt_steps(tiny, capsys):
    run, _ = tiny
    args = ["evaluate", "--suite", "builtin", "--checkpoint", f"m={run}", "--adapt-steps", "-1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--adapt-steps must be >= 0, got -1" in err


@pytest.mark.parametrize("name", ["tfidf", "scratch", "scratch+tapt", "m"])
def test_cli_rejects_a_checkpoint_named_like_another_system(tiny, capsys, name):
    run, _ = tiny
    args = ["evaluate", "--suite", "builtin", "--checkpoint", f"m={run}"]
    args += ["--checkpoint", f"{name}={run}"]  # "m" twice
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{name}={run}': expected a new NAME=PATH" in err
