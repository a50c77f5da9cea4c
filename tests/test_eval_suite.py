"""The suite report: mean ± sample standard deviation and the CLUE-style average."""

from __future__ import annotations

import statistics

import pytest

from myriad.errors import UserError
from myriad.eval.finetune import FinetuneConfig
from myriad.eval.suite import SuiteConfig, render_report, run_suite


def _row(dev: float, test: float) -> dict:
    return {"dev": {"accuracy": dev, "macro_f1": dev}, "test": {"accuracy": test, "macro_f1": test}}


def test_report_numbers():
    results = {
        "tfidf": {"zh-sentiment": [_row(0.8, 0.9)], "zh-nextsent": [_row(0.6, 0.5)]},
        "moe": {
            "zh-sentiment": [_row(0.8, 0.80), _row(0.8, 0.84), _row(0.8, 0.83)],
            "zh-nextsent": [_row(0.6, 0.60), _row(0.6, 0.66), _row(0.6, 0.63)],
        },
    }
    text = render_report(
        results, {"tfidf": "baseline", "moe": "pre-trained"}, SuiteConfig(), FinetuneConfig()
    )
    sd = 100 * statistics.stdev([0.80, 0.84, 0.83])
    assert f"| moe | 82.33 ± {sd:.2f} |" in text
    averages = [(0.80 + 0.60) / 2, (0.84 + 0.66) / 2, (0.83 + 0.63) / 2]
    avg = f"{100 * statistics.mean(averages):.2f} ± {100 * statistics.stdev(averages):.2f}"
    assert text.splitlines()[7].endswith(f"| {avg} |")
    assert "| tfidf | 90.00 ± 0.00 | 50.00 ± 0.00 | 70.00 ± 0.00 |" in text
    assert "- `moe`: pre-trained" in text and "lr=0.0003" in text


def test_missing_checkpoint_fails_before_any_run(tmp_path):
    missing = tmp_path / "runs" / "typo"
    cfg = SuiteConfig(
        checkpoints={"moe": str(missing)}, work_dir=str(tmp_path / "work"), report="r.md"
    )
    with pytest.raises(UserError, match=f"checkpoint path not found: {missing}"):
        run_suite(cfg, FinetuneConfig(), log=lambda _: None)
    assert not (tmp_path / "work").exists()  # not even the TF-IDF baseline ran
