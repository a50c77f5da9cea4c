"""Fine-tuning end to end on a tiny checkpoint: heads, outputs, evaluate, bad input via the CLI."""

from __future__ import annotations

import json
import random
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from myriad.cli import main
from myriad.config import RunConfig, to_dict
from myriad.data import DataConfig
from myriad.data.tokenizer import train_tokenizer
from myriad.eval.encode import encode_examples, make_batch
from myriad.eval.finetune import FinetuneConfig, run_finetune
from myriad.eval.formats import LabelMap
from myriad.eval.heads import SequenceClassifier, load_backbone
from myriad.eval.scoring import evaluate_finetuned
from myriad.eval.tasks import load_task
from myriad.model import MoETransformerLM
from myriad.model.config import ModelConfig, MoEConfig
from myriad.train.checkpoint import save_checkpoint

GOOD, BAD = "好棒赞美妙优秀满意喜欢", "差坏烂糟糕失望难过讨厌"
FILLER = "这个那个我们你们他们今天昨天东西地方时候觉得"


def _sentence(rng: random.Random, words: str) -> str:
    """Filler characters with two words of one polarity: the label is in the text."""
    chars = [rng.choice(FILLER) for _ in range(rng.randint(6, 14))]
    for _ in range(2):
        chars.insert(rng.randrange(len(chars) + 1), rng.choice(words))
    return "".join(chars)


def _write_task(folder: Path, n_train: int = 160, n_dev: int = 40) -> Path:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", 10)):
        rows = []
        for i in range(n):
            label = "pos" if i % 2 else "neg"
            row = {"id": f"{split}-{i}", "text": _sentence(rng, GOOD if label == "pos" else BAD)}
            rows.append(row | ({"label": label} if split != "test" else {}))
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (folder / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return folder


def _checkpoint(run: Path, objective: str = "mlm") -> Path:
    docs = [GOOD + FILLER + BAD] * 4
    train_tokenizer(docs, 96, run / "tokenizer.json")
    model_cfg = ModelConfig(
        objective=objective,
        vocab_size=96,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_seq_len=32,
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=32, every=2),
    )
    torch.manual_seed(0)
    model = MoETransformerLM(model_cfg)
    cfg = to_dict(RunConfig(model=model_cfg, data=DataConfig(seq_len=32)))
    save_checkpoint(run / "checkpoints", step=1, model=model, config=cfg, state={}, summary={})
    return run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return _checkpoint(root / "run"), _write_task(root / "data")


FAST = dict(lr=3e-3, batch_size=16, max_len=32, max_steps=40, eval_every=10, patience=5)


def test_finetune_lifts_dev_accuracy_above_chance(tiny, tmp_path):
    run, data = tiny
    task = load_task("jsonl", data)
    out = tmp_path / "ft"
    result = run_finetune(task, run, out, FinetuneConfig(**FAST), progress=False, log=print)
    assert result.dev["accuracy"] >= 0.85  # chance is 0.5: the dev set is balanced
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dev"] == result.dev and summary["steps"] <= 40
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(h["accuracy"] for h in history) == pytest.approx(result.dev["accuracy"])
    preds = [json.loads(line) for line in (out / "test_predict.json").read_text().splitlines()]
    assert [p["id"] for p in preds] == [f"test-{i}" for i in range(10)]
    assert {p["label"] for p in preds} <= {"neg", "pos"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]  # no temporary left behind
    again = evaluate_finetuned(out, task, tmp_path / "again.json", device="cpu")
    assert again["dev"] == pytest.approx(result.dev, abs=1e-12)
    assert (tmp_path / "again.json").read_text() == (out / "test_predict.json").read_text()


def test_same_seed_same_result(tiny, tmp_path):
    run, data = tiny
    task = load_task("jsonl", data)
    cfg = FinetuneConfig(**(FAST | {"max_steps": 6, "eval_every": 3}))
    first = run_finetune(task, run, tmp_path / "a", cfg, progress=False, log=lambda _: None)
    second = run_finetune(task, run, tmp_path / "b", cfg, progress=False, log=lambda _: None)
    assert first.dev == second.dev
    a = (tmp_path / "a" / "metrics.jsonl").read_text()
    assert a == (tmp_path / "b" / "metrics.jsonl").read_text()


def _reference_logits(model: SequenceClassifier, ids: list[int]) -> torch.Tensor:
    """One unpadded sequence, pooled by hand."""
    h_1SD = model.backbone.encode(torch.tensor([ids]), torch.ones(1, len(ids)))[0]
    pooled_1D = h_1SD[:, 0] if model.pooling == "cls" else h_1SD[:, -1]
    return model.head(pooled_1D)[0]


@pytest.mark.parametrize(("objective", "pooling"), [("mlm", "cls"), ("clm", "last")])
def test_pooling_matches_unpadded_reference(tmp_path, objective, pooling):
    run = _checkpoint(tmp_path / "run", objective)
    backbone, _, tokenizer, _ = load_backbone(run, None, from_scratch=False, seed=0)
    model = SequenceClassifier(backbone, 3).eval()
    assert model.pooling == pooling
    task = load_task("jsonl", _write_task(tmp_path / "data", 8, 4))
    enc = encode_examples(tokenizer, task.splits["train"], LabelMap(("neg", "pos", "x")), 32)
    batch = make_batch(enc, list(range(8)), 0, torch.device("cpu"))
    with torch.no_grad():
        logits_BC, _ = model(batch["input_ids"], batch["attention_mask"])
        for row in range(8):
            ref_C = _reference_logits(model, enc.ids[row])
            torch.testing.assert_close(logits_BC[row], ref_C, rtol=1e-4, atol=1e-5)


def test_from_scratch_ignores_weights(tiny):
    run, _ = tiny
    loaded, *_ = load_backbone(run, None, from_scratch=False, seed=3)
    fresh, *_ = load_backbone(run, None, from_scratch=True, seed=3)
    torch.manual_seed(3)
    reference = MoETransformerLM(loaded.cfg)
    assert torch.equal(fresh.embed.weight, reference.embed.weight)
    assert not torch.equal(fresh.embed.weight, loaded.embed.weight)


def _cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_cli_finetune_and_bad_input(tiny, tmp_path, capsys):
    run, data = tiny
    out = tmp_path / "out"
    base = ["finetune", "--checkpoint", str(run), "--out", str(out), "--threads", "1"]
    code = main([*base, "--task", "jsonl", "--data-dir", str(data), "--max-steps", "2"])
    assert code == 0 and (out / "summary.json").is_file()
    hint = capsys.readouterr().out.split("Next:\n", 1)[1].splitlines()[0]
    words = shlex.split(hint)  # the printed next step runs as it is
    assert words[:2] == ["myriad", "evaluate"] and main(words[1:]) == 0

    bad = _write_task(tmp_path / "bad", 8, 4)
    dev = bad / "dev.jsonl"
    dev.write_text(dev.read_text() + '{"text": "好", "label": "meh"}\n', encoding="utf-8")
    out2 = tmp_path / "out2"
    args = [*base[:3], "--out", str(out2), "--task", "jsonl", "--data-dir", str(bad)]
    code, err = _cli(args, capsys)
    assert code == 2 and err == (
        f"myriad: error: {dev}:5: label 'meh' is not one of the task's labels (neg, pos)"
    )
    assert not out2.exists()

    dev.write_text('{"label": "pos"}\n', encoding="utf-8")
    code, err = _cli(args, capsys)
    assert (code, err) == (2, f"myriad: error: {dev}:1: missing field 'text'")
    dev.write_text("\n", encoding="utf-8")
    code, err = _cli(args, capsys)
    assert (code, err) == (2, f"myriad: error: {dev}: empty file, no examples")
    assert not out2.exists() and "\n" not in err


def test_vocab_mismatch_is_a_user_error(tiny, tmp_path, capsys):
    run, data = tiny
    big = tmp_path / "big.json"
    many = "".join(chr(0x4E00 + i) for i in range(200))  # 200 distinct characters
    train_tokenizer([GOOD + FILLER + BAD + many], 300, big)
    other = tmp_path / "other.json"
    train_tokenizer(["甲乙丙丁戊己庚辛壬癸子丑寅卯" * 9], 96, other)
    out = tmp_path / "out"
    for tok, why in ((big, "tokens but checkpoint"), (other, "token ids differ")):
        args = ["finetune", "--checkpoint", str(run), "--task", "jsonl", "--data-dir", str(data)]
        code, err = _cli([*args, "--tokenizer", str(tok), "--out", str(out)], capsys)
        assert code == 2 and err.startswith(f"myriad: error: {tok}:1: vocabulary mismatch")
        assert why in err and "\n" not in err
    assert not out.exists()


def test_out_that_is_not_a_finetune_folder_is_refused_before_training(tiny, tmp_path, capsys):
    run, data = tiny
    pretrained = shutil.copytree(run, tmp_path / "pretrained")  # --out runs/tiny-zh, by mistake
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    args = ["finetune", "--checkpoint", str(run), "--task", "jsonl", "--data-dir", str(data)]
    for out, why in (
        (pretrained, f"--out {pretrained} exists and is not a myriad finetune folder"),
        (notes, f"--out {notes} exists and is not a myriad finetune folder"),
        (notes / "ft", f"--out {notes / 'ft'}: {notes} is a file, not a folder"),
    ):
        code, err = _cli([*args, "--max-steps", "1", "--out", str(out)], capsys)
        assert code == 2 and why in err and "\n" not in err
    assert (pretrained / "checkpoints").is_dir() and notes.read_text() == "mine\n"


@pytest.mark.parametrize(("flag", "value"), [("--eval-batch-size", "0"), ("--warmup-ratio", "-1")])
def test_bad_finetune_flag_names_it(tiny, tmp_path, capsys, flag, value):
    run, data = tiny
    args = ["finetune", "--checkpoint", str(run), "--task", "jsonl", "--data-dir", str(data)]
    code, err = _cli([*args, "--out", str(tmp_path / "ft"), flag, value], capsys)
    assert code == 2 and err.startswith(f"myriad: error: {flag} must be") and "\n" not in err
    assert not (tmp_path / "ft").exists()


def test_unknown_device_names_the_flag(tiny, tmp_path, capsys):
    run, data = tiny
    args = ["finetune", "--checkpoint", str(run), "--task", "jsonl", "--data-dir", str(data)]
    code, err = _cli([*args, "--out", str(tmp_path / "ft"), "--device", "gpu0"], capsys)
    assert (code, err) == (
        2,
        "myriad: error: --device: unknown device 'gpu0'; use auto, cpu or cuda[:N]",
    )
    assert not (tmp_path / "ft").exists()


def test_evaluate_bad_out_or_damaged_tokenizer_is_one_line(tiny, tmp_path, capsys):
    run, data = tiny
    ft = tmp_path / "ft"
    task = ["--task", "jsonl", "--data-dir", str(data)]
    assert (
        main(["finetune", "--checkpoint", str(run), *task, "--max-steps", "1", "--out", str(ft)])
        == 0
    )
    for out in (tmp_path, tmp_path / "notes.txt" / "pred.json"):  # a folder; below a file
        (tmp_path / "notes.txt").write_text("mine\n")
        capsys.readouterr()
        code, err = _cli(["evaluate", "--model", str(ft), *task, "--out", str(out)], capsys)
        assert code == 2 and err.startswith(f"myriad: error: could not write {out}: ")
        assert "\n" not in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    (ft / "tokenizer.json").write_text("garbage")
    code, err = _cli(["evaluate", "--model", str(ft), *task], capsys)
    assert code == 2 and err.startswith(f"myriad: error: {ft / 'tokenizer.json'}:1: not a readable")


def test_evaluate_needs_a_mode(capsys):
    code, err = _cli(["evaluate"], capsys)
    assert code == 2 and "needs --suite NAME, or --model FT_DIR --task TASK" in err


def test_clue_submission_file(tiny, tmp_path):
    run, _ = tiny
    task = load_task("afqmc", Path(__file__).parent / "fixtures" / "clue" / "afqmc")
    cfg = FinetuneConfig(**(FAST | {"max_steps": 2, "eval_every": 1}))
    run_finetune(task, run, tmp_path / "ft", cfg, progress=False, log=lambda _: None)
    rows = [
        json.loads(x) for x in (tmp_path / "ft" / "afqmc_predict.json").read_text().splitlines()
    ]
    assert [r["id"] for r in rows] == [0, 1] and all(r["label"] in ("0", "1") for r in rows)
