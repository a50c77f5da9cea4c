"""CLUE 1.1 and generic task formats: parsing, label maps, and one-line errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from myriad.errors import UserError
from myriad.eval.formats import CLUE_TASKS, TNEWS_LABELS, LabelMap
from myriad.eval.tasks import GenericOptions, load_task

FIXTURES = Path(__file__).parent / "fixtures" / "clue"


def _task(name: str):
    return load_task(name, FIXTURES / name)


def test_afqmc_pairs_and_test_ids():
    task = _task("afqmc")
    assert task.labels.labels == ("0", "1") and task.is_pair
    first = task.splits["train"][0]
    assert (first.text_a, first.text_b, first.label) == (
        "双十一花呗提额在哪",
        "里可以提花呗额度",
        "0",
    )
    assert [ex.id for ex in task.splits["test"]] == [0, 1]
    assert all(ex.label is None for ex in task.splits["test"])
    assert task.submission == "afqmc_predict.json"


def test_tnews_label_set_is_clue_11():
    task = _task("tnews")
    assert len(task.labels) == 15 and "105" not in task.labels and "111" not in task.labels
    assert task.labels.labels == TNEWS_LABELS
    assert [ex.label for ex in task.splits["train"]] == ["102", "110", "104"]
    assert not task.is_pair and task.splits["train"][0].text_b is None


def test_iflytek_has_119_labels():
    task = _task("iflytek")
    assert len(task.labels) == 119
    assert task.labels.to_index("118") == 118
    assert task.splits["dev"][0].text_a == "高德地图导航，实时路况"


@pytest.mark.parametrize(
    ("name", "skipped"), [("ocnli", {"train": 1, "dev": 0}), ("cmnli", {"train": 0, "dev": 1})]
)
def test_nli_skips_pairs_without_gold_label(name, skipped):
    task = _task(name)
    assert task.labels.labels == ("entailment", "neutral", "contradiction")
    assert task.skipped == skipped
    assert all(ex.label != "-" for split in ("train", "dev") for ex in task.splits[split])


def test_ocnli_reads_clues_train_50k_file():
    # ocnli_public ships train.50k.json (and no train.json); CLUE scores it as ocnli_50k
    assert CLUE_TASKS["ocnli"].files == {
        "train": "train.50k.json",
        "dev": "dev.json",
        "test": "test.json",
    }
    task = _task("ocnli")
    assert [ex.id for ex in task.splits["train"]] == [0, 1, 2]
    assert task.submission == "ocnli_50k_predict.json"
    with pytest.raises(UserError, match="needs --data-dir with train.50k.json, dev.json"):
        load_task("ocnli")


def test_csl_joins_keywords():
    task = _task("csl")
    ex = task.splits["train"][0]
    assert ex.text_b == "水声学 FFT 波束形成 3维成像声呐"  # " ".join, as CLUE's CslProcessor
    assert ex.text_a.startswith("为解决传统均匀FFT") and ex.id == 1
    assert [ex.id for ex in task.splits["test"]] == [0, 2415]  # CSL test ids are not line numbers
    assert task.splits["test"][1].text_b == "正散度 风神"


def test_cluewsc_marks_both_spans():
    task = _task("cluewsc2020")
    assert task.labels.labels == ("true", "false")
    first, second = task.splits["train"]
    assert first.text_a == "我回家的时候，床上放着一只[猫]，<它>正在睡觉。"
    assert first.text_b == "它->猫" and first.id == 0
    assert second.text_a == "我回家的时候，[床]上放着一只猫，<它>正在睡觉。"
    assert task.splits["test"][0].text_a == "[小明]把书给了小红，<他>很高兴。"
    assert task.submission == "cluewsc11_predict.json"


def test_cluewsc_pronoun_before_noun(tmp_path):
    # the first line of CLUE 1.1's cluewsc2020 test.json: span2 (pronoun) precedes span1
    line = (
        '{"id": 0, "target": {"span1_index": 46, "span1_text": "曹操", "span2_index": 17, '
        '"span2_text": "他们"}, "text": "作为代价，这个兵种在不拔剑的时候，他们看起来就跟普通的精锐'
        '没什么区别，顺带从这里也可以看出来曹操给曹真补了这五千多锐士是怎么个想法，很明显曹操也不是好鸟。"}'
    )
    for split in ("train", "dev"):
        (tmp_path / f"{split}.json").write_bytes(
            (FIXTURES / "cluewsc2020" / f"{split}.json").read_bytes()
        )
    _write(tmp_path, "test.json", [line])
    (ex,) = load_task("cluewsc2020", tmp_path).splits["test"]
    assert ex.id == 0 and ex.text_b == "他们->曹操"
    assert ex.text_a.startswith("作为代价，这个兵种在不拔剑的时候，<他们>看起来")
    assert "可以看出来[曹操]给曹真" in ex.text_a


def test_label_strings_round_trip_as_clue_writes_them():
    for name, label in (("tnews", "116"), ("iflytek", "118"), ("afqmc", "1"), ("csl", "0")):
        labels = LabelMap(CLUE_TASKS[name].labels)
        assert labels.to_label(labels.to_index(label)) == label  # a string, as submitted
    assert LabelMap(CLUE_TASKS["cluewsc2020"].labels).to_label(0) == "true"


def test_every_clue_task_has_a_fixture():
    assert sorted(CLUE_TASKS) == sorted(p.name for p in FIXTURES.iterdir())


def test_label_map_both_ways():
    labels = LabelMap(("entailment", "neutral", "contradiction"))
    assert [labels.to_index(x) for x in labels.labels] == [0, 1, 2]
    assert [labels.to_label(i) for i in range(3)] == list(labels.labels)
    assert "neutral" in labels and "-" not in labels
    with pytest.raises(UserError):
        LabelMap(("only",))


def _write(folder: Path, name: str, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _copy_afqmc(tmp_path: Path) -> Path:
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.json").write_bytes(
            (FIXTURES / "afqmc" / f"{split}.json").read_bytes()
        )
    return tmp_path


def test_label_outside_set_names_file_and_line(tmp_path):
    data = _copy_afqmc(tmp_path)
    row = {"sentence1": "a", "sentence2": "b", "label": "2"}
    dev = _write(data, "dev.json", [json.dumps({**row, "label": "1"}), "", json.dumps(row)])
    with pytest.raises(UserError, match=f"^{dev}:3: label '2' is not one of the task's labels"):
        load_task("afqmc", data)


def test_missing_field_names_file_and_line(tmp_path):
    data = _copy_afqmc(tmp_path)
    train = _write(data, "train.json", [json.dumps({"sentence1": "a", "label": "0"})])
    with pytest.raises(UserError, match=f"^{train}:1: missing field 'sentence2'$"):
        load_task("afqmc", data)


def test_empty_file_and_bad_json(tmp_path):
    data = _copy_afqmc(tmp_path)
    dev = _write(data, "dev.json", ["", "  "])
    with pytest.raises(UserError, match=f"^{dev}: empty file, no examples$"):
        load_task("afqmc", data)
    _write(data, "dev.json", ['{"sentence1": "a",'])
    with pytest.raises(UserError, match=f"^{dev}:1: not valid JSON"):
        load_task("afqmc", data)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_file_that_is_not_utf8_names_it(tmp_path, fmt):
    lines = ['{"text": "好", "label": "a"}', '{"text": "坏", "label": "b"}']
    if fmt == "csv":
        lines = ["text,label", "好,a", "坏,b"]
    _write(tmp_path, f"train.{fmt}", lines)
    dev = _write(tmp_path, f"dev.{fmt}", lines)
    dev.write_bytes(dev.read_bytes() + b"\xff\xfe\n")  # a Latin-1 or UTF-16 file, say
    with pytest.raises(UserError, match=f"^{dev}: not UTF-8 text$"):
        load_task(fmt, tmp_path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_byte_order_mark_is_not_part_of_the_first_field(tmp_path, fmt):
    """Excel and Windows editors start UTF-8 files with a BOM; it must not rename a column."""
    lines = ['{"text": "好", "label": "a"}', '{"text": "坏", "label": "b"}']
    if fmt == "csv":
        lines = ["text,label", "好,a", "坏,b"]
    for split in ("train", "dev"):
        path = _write(tmp_path, f"{split}.{fmt}", lines)
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    task = load_task(fmt, tmp_path)
    assert [e.text_a for e in task.splits["train"]] == ["好", "坏"]


def test_unknown_task_and_missing_data_dir(tmp_path):
    with pytest.raises(UserError, match="unknown; tasks: zh-sentiment, zh-nextsent, afqmc"):
        load_task("glue")
    with pytest.raises(UserError, match="needs --data-dir"):
        load_task("tnews")
    with pytest.raises(UserError, match="no such folder"):
        load_task("tnews", tmp_path / "nope")


def test_generic_jsonl_pairs(tmp_path):
    rows = [{"q": "今天", "r": "明天", "y": "yes"}, {"q": "a", "r": "b", "y": "no"}]
    _write(tmp_path, "train.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows])
    _write(tmp_path, "dev.jsonl", [json.dumps(rows[0], ensure_ascii=False)])
    opts = GenericOptions(text_field="q", text_pair_field="r", label_field="y")
    task = load_task("jsonl", tmp_path, opts)
    assert task.labels.labels == ("no", "yes") and task.is_pair and "test" not in task.splits
    assert task.splits["dev"][0].text_b == "明天"


def test_generic_csv_single_and_bad_label(tmp_path):
    _write(tmp_path, "train.csv", ["id,text,label", "7,很好,pos", '8,"差,很差",neg'])
    _write(tmp_path, "dev.csv", ["text,label", "不错,pos"])
    _write(tmp_path, "test.csv", ["id,text", "x1,还行"])
    task = load_task("csv", tmp_path)
    assert task.splits["train"][1].text_a == "差,很差" and task.splits["train"][0].id == "7"
    assert task.splits["test"][0].id == "x1" and not task.is_pair
    dev = _write(tmp_path, "dev.csv", ["text,label", "不错,pos", "一般,meh"])
    with pytest.raises(UserError, match=f"^{dev}:3: label 'meh'"):
        load_task("csv", tmp_path)
    _write(tmp_path, "train.csv", ["text,label", "很好,pos", "差,pos"])
    with pytest.raises(UserError, match="needs at least 2 distinct labels"):
        load_task("csv", tmp_path)
