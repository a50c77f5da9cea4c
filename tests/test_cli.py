"""User mistakes give one line on stderr, exit status 2, and leave nothing half-written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from myriad.cli import main

SMALL = [
    "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.eval_every=1",
    "--set", "train.eval_batches=1", "--set", "model.d_model=32", "--set", "model.n_heads=2",
    "--set", "model.d_ff=64", "--set", "model.moe.d_expert=32", "--set", "model.vocab_size=300",
    "--set", "data.seq_len=16", "--set", "model.max_seq_len=16",
]  # fmt: skip


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("myriad: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_unknown_recipe_key(capsys):
    code, _, err = run_cli(capsys, "info", "tiny-zh", "--set", "train.nope=1")
    assert_one_line_error(code, err, "train.nope", "valid keys: train.seed")


def test_wrong_type(capsys):
    code, _, err = run_cli(capsys, "info", "tiny-zh", "--set", "train.steps=many")
    assert_one_line_error(code, err, "train.steps must be int, got 'many'")


def test_unknown_recipe(capsys):
    code, _, err = run_cli(capsys, "pretrain", "--recipe", "huge", "--out", "/nonexistent/x")
    assert_one_line_error(code, err, "unknown recipe 'huge'")


def test_info_on_a_missing_path_names_it(capsys, tmp_path):
    missing = tmp_path / "runs" / "typo"
    code, _, err = run_cli(capsys, "info", str(missing))
    assert_one_line_error(code, err, f"no such checkpoint or recipe file: {missing}")


def test_missing_data_path_writes_nothing(capsys, tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-corpus.txt"
    code, _, err = run_cli(capsys, "pretrain", "--data", str(missing), "--out", str(out), *SMALL)
    assert_one_line_error(code, err, str(missing))
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_empty_corpus_writes_nothing(capsys, tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n\n  \n", encoding="utf-8")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--data", str(corpus), "--out", str(out), *SMALL)
    assert_one_line_error(code, err, str(corpus))
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    corpus = out.parent / "corpus.txt"
    corpus.write_text("".join(f"第{i}条新闻：今天天气很好，我们去公园散步。\n" for i in range(200)))
    assert main(["pretrain", "--data", str(corpus), "--out", str(out), *SMALL]) == 0
    return out


def test_pretrain_then_info_reports_training_state(capsys, small_run):
    code, out, _ = run_cli(capsys, "info", str(small_run))
    assert code == 0
    assert "active per token" in out and "training state" in out
    assert "step" in out


def test_info_shows_small_learning_rates():
    from myriad.config import load_recipe, to_dict
    from myriad.info import describe

    state = {"lr": 5e-05, "train_loss": 5.278134, "elapsed_s": 401.2345}
    text = describe({"config": to_dict(load_recipe("tiny-zh")), "state": state})
    shown = {
        line.split()[0]: line.split()[1] for line in text.split("training state\n")[1].splitlines()
    }
    assert shown == {"lr": "5e-05", "train_loss": "5.2781", "elapsed_s": "401.23"}


def test_pretrain_refuses_to_overwrite_without_resume(capsys, small_run):
    code, _, err = run_cli(capsys, "pretrain", "--out", str(small_run), *SMALL)
    assert_one_line_error(code, err, "--resume")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint_is_a_clear_error(capsys, small_run, tmp_path, damage):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    weights = sorted(copy.rglob("model.safetensors"))[-1]
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 64)
    code, _, err = run_cli(capsys, "info", str(weights.parent))
    assert_one_line_error(code, err, "model.safetensors")


def test_console_script_exit_status(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "myriad", "info", "tiny-zh", "--set", "model.moe.top_k=0"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("myriad: error:") and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-1", "train.lr must be > 0, got -1.0"),  # AdamW's own ValueError before
        ("train.beta1=1.5", "train.beta1 must be in [0, 1), got 1.5"),
        ("train.eps=-1", "train.eps must be >= 0, got -1.0"),
        ("train.warmup_steps=-5", "train.warmup_steps must be >= 0, got -5"),
        ("train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0 (0 keeps all), got -1"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0 (0 never clips), got -1.0"),
    ],
)
def test_bad_optimizer_setting_names_the_key_and_writes_nothing(
    capsys, tmp_path, override, message
):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--out", str(out), *SMALL, "--set", override)
    assert_one_line_error(code, err, message)
    assert not out.exists()


def test_out_that_is_a_file_is_a_clear_error(capsys, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    for out in (taken, taken / "run"):
        code, _, err = run_cli(capsys, "pretrain", "--out", str(out), *SMALL)
        assert_one_line_error(code, err, f"cannot create the run directory {out}")
    assert taken.read_text() == "mine\n"


def test_bad_data_leaves_no_run_folder(capsys, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "今天天气很好"}\n{"text": "公园\n', encoding="utf-8")
    out = tmp_path / "new" / "run"  # its parent is created for the run too
    code, _, err = run_cli(capsys, "pretrain", "--data", str(corpus), "--out", str(out), *SMALL)
    assert_one_line_error(code, err, f"{corpus}:2: not valid JSON")
    assert not (tmp_path / "new").exists()


def test_corpus_that_is_not_utf8_names_the_file(capsys, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes('{"text": "今天天气很好"}\n'.encode() + b'{"text": "\xff"}\n')
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--data", str(corpus), "--out", str(out), *SMALL)
    assert_one_line_error(code, err, f"{corpus}: not UTF-8 text")
    assert not out.exists()


def test_info_refuses_overrides_of_a_checkpoint(capsys, small_run):
    code, _, err = run_cli(capsys, "info", str(small_run), "--set", "train.steps=9")
    assert_one_line_error(code, err, f"--set applies to recipes, not to the checkpoint {small_run}")


def test_info_names_the_checkpoint_config_with_a_bad_key(capsys, small_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    config = sorted(copy.glob("checkpoints/step-*/config.json"))[-1]
    edited = json.loads(config.read_text())
    edited["train"]["stpes"] = 3
    config.write_text(json.dumps(edited))
    code, _, err = run_cli(capsys, "info", str(copy))
    assert_one_line_error(code, err, str(config), "train.stpes")
