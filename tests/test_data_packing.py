"""Packing: exact sequences on a hand-made corpus, nothing lost, word starts, cache reuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from myriad.data import DataConfig, prepare_data
from myriad.data.pku import parse_line, zh_news_path
from myriad.data.prepare import heldout_split
from myriad.errors import UserError

DOCS = ["甲乙丙", "丁戊", "己", "庚"]


def _prepare(tmp_path: Path, corpus: str, seq_len: int, vocab_size: int = 200, **kw):
    cfg = DataConfig(corpus=corpus, seq_len=seq_len, **kw)
    out = tmp_path / "run"
    return prepare_data(cfg, vocab_size=vocab_size, objective="mlm", out_dir=out, seed=0)


def _rows_as_tokens(data) -> list[list[str]]:
    tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
    ids = np.memmap(data.cache_dir / "ids.bin", dtype=np.uint16, mode="r")
    rows = ids.reshape(-1, data.seq_len)
    return [[str(tokenizer.id_to_token(int(i))) for i in row] for row in rows]


def test_exact_sequences(tmp_path: Path):
    (tmp_path / "docs.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    data = _prepare(tmp_path, str(tmp_path / "docs.txt"), seq_len=4)
    assert _rows_as_tokens(data) == [
        ["[CLS]", "甲", "乙", "丙"],
        ["[CLS]", "[SEP]", "丁", "戊"],
        ["[CLS]", "[SEP]", "己", "[SEP]"],
        ["[CLS]", "庚", "[SEP]", "[PAD]"],
    ]
    assert data.num_tokens == 7 and data.num_train_sequences + data.num_heldout_sequences == 4
    assert data.special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def test_nothing_lost_and_word_starts_from_pieces(tmp_path: Path):
    docs = ["tokenization of 中文 text", "packing packs sequences", "新闻 news 1998"] * 20
    (tmp_path / "d.txt").write_text("\n".join(docs), encoding="utf-8")
    data = _prepare(tmp_path, str(tmp_path / "d.txt"), seq_len=16, vocab_size=64)
    tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
    ids = np.memmap(data.cache_dir / "ids.bin", dtype=np.uint16, mode="r").reshape(-1, 16)
    starts = np.memmap(data.cache_dir / "word_starts.bin", dtype=np.uint8, mode="r").reshape(-1, 16)
    assert (ids[:, 0] == 2).all()
    specials = set(data.special_ids.values())
    body = [int(i) for i in ids[:, 1:].reshape(-1) if int(i) not in specials]
    expected = [i for d in docs for i in tokenizer.encode(d, add_special_tokens=False).ids]
    assert body == expected
    flat_ids, flat_starts = ids[:, 2:].reshape(-1), starts[:, 2:].reshape(-1)
    is_piece = np.array([str(tokenizer.id_to_token(int(i))).startswith("##") for i in flat_ids])
    assert is_piece.any()
    assert (flat_starts == ~is_piece).all()
    assert (starts[:, :2] == 1).all()  # [CLS] and a row's first token always start a word


def test_gold_word_starts_zh_news(tmp_path: Path):
    data = _prepare(tmp_path, "zh-news", seq_len=64, vocab_size=2000, max_documents=40)
    tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
    ids = np.memmap(data.cache_dir / "ids.bin", dtype=np.uint16, mode="r").reshape(-1, 64)
    starts = np.memmap(data.cache_dir / "word_starts.bin", dtype=np.uint8, mode="r")
    first = [tokenizer.id_to_token(int(i)) for i in ids[0, 1:10]]
    assert first == ["迈", "向", "充", "满", "希", "望", "的", "新", "世"]
    assert starts.reshape(-1, 64)[0, 1:10].tolist() == [1, 0, 1, 0, 1, 0, 1, 1, 1]
    with zh_news_path().open(encoding="utf-8") as handle:
        assert parse_line(next(handle))[:6] == ["迈向", "充满", "希望", "的", "新", "世纪"]


def test_cache_reused_and_invalidated(tmp_path: Path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(DOCS * 5), encoding="utf-8")
    first = _prepare(tmp_path, str(corpus), seq_len=8)
    stamp = (first.cache_dir / "ids.bin").stat().st_mtime_ns
    tok_stamp = first.tokenizer_path.stat().st_mtime_ns
    again = _prepare(tmp_path, str(corpus), seq_len=8)
    assert again.cache_dir == first.cache_dir
    assert (again.cache_dir / "ids.bin").stat().st_mtime_ns == stamp
    assert again.tokenizer_path.stat().st_mtime_ns == tok_stamp
    longer = _prepare(tmp_path, str(corpus), seq_len=16)
    assert longer.cache_dir != first.cache_dir
    corpus.write_text("\n".join(DOCS * 6), encoding="utf-8")
    changed = _prepare(tmp_path, str(corpus), seq_len=8)
    assert changed.cache_dir != first.cache_dir and changed.num_tokens == 42
    assert not list((tmp_path / "run" / "data").glob("*.tmp-*"))


def test_configured_tokenizer_reused_and_checked(tmp_path: Path):
    (tmp_path / "docs.txt").write_text("\n".join(DOCS), encoding="utf-8")
    first = _prepare(tmp_path, str(tmp_path / "docs.txt"), seq_len=4)
    saved = tmp_path / "keep.json"
    saved.write_bytes(first.tokenizer_path.read_bytes())
    cfg = DataConfig(corpus=str(tmp_path / "docs.txt"), seq_len=4, tokenizer=str(saved))
    other = prepare_data(cfg, vocab_size=200, objective="clm", out_dir=tmp_path / "b", seed=1)
    assert other.tokenizer_path.read_bytes() == saved.read_bytes()
    with pytest.raises(UserError, match=r"keep\.json.*more than model\.vocab_size = 10"):
        prepare_data(cfg, vocab_size=10, objective="clm", out_dir=tmp_path / "c", seed=1)
    cfg.tokenizer = str(tmp_path / "gone.json")
    with pytest.raises(UserError, match=r"gone\.json"):
        prepare_data(cfg, vocab_size=200, objective="clm", out_dir=tmp_path / "c", seed=1)


def test_too_small_corpus_and_bad_values(tmp_path: Path):
    (tmp_path / "one.txt").write_text("甲\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"one\.txt.*need at least 2"):
        _prepare(tmp_path, str(tmp_path / "one.txt"), seq_len=8)
    with pytest.raises(UserError, match=r"data\.seq_len"):
        _prepare(tmp_path, str(tmp_path / "one.txt"), seq_len=1)
    with pytest.raises(UserError, match=r"data\.heldout_fraction"):
        _prepare(tmp_path, str(tmp_path / "one.txt"), seq_len=8, heldout_fraction=1.0)


@pytest.mark.parametrize(("n", "fraction", "held"), [(2, 0.0, 1), (100, 0.01, 1), (1000, 0.05, 50)])
def test_heldout_split(n: int, fraction: float, held: int):
    train, heldout = heldout_split(n, fraction)
    assert len(heldout) == held and len(train) == n - held
    assert not set(train.tolist()) & set(heldout.tolist())
    assert sorted(train.tolist() + heldout.tolist()) == list(range(n))


def test_one_long_document_still_trains_and_says_so(tmp_path: Path):
    """Every row shares the only document with the held-out row: nothing would be left to
    train on, so the rows stay in training and the report says the splits share it."""
    (tmp_path / "long.txt").write_text("甲乙丙丁戊己庚辛壬癸" * 3 + "\n", encoding="utf-8")
    lines: list[str] = []
    cfg = DataConfig(corpus=str(tmp_path / "long.txt"), seq_len=8)
    data = prepare_data(
        cfg,
        vocab_size=200,
        objective="mlm",
        out_dir=tmp_path / "run",
        seed=0,
        progress=lines.append,
    )
    assert (data.num_train_sequences, data.num_heldout_sequences) == (4, 1)
    assert "held-out sequences share documents with training ones" in lines[-1]


def test_corpus_error_mid_pack_leaves_no_partial_cache(tmp_path: Path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(f'{{"text": "{d}"}}\n' for d in DOCS * 3000), encoding="utf-8")
    first = _prepare(tmp_path, str(corpus), seq_len=8)
    tokenizer = tmp_path / "tokenizer.json"  # reused, so the bad line is met while packing
    tokenizer.write_bytes(first.tokenizer_path.read_bytes())
    with corpus.open("a", encoding="utf-8") as handle:
        handle.write('{"text": "公园\n')  # the last line is cut off
    with pytest.raises(UserError, match="not valid JSON"):
        _prepare(tmp_path, str(corpus), seq_len=8, tokenizer=str(tokenizer))
    packed = sorted(p.name for p in (tmp_path / "run" / "data").glob("packed-*"))
    assert packed == [first.cache_dir.name]  # no .tmp-<pid> folder beside it
