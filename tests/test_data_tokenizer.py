"""Tokenizer: CJK per character, loads in transformers, round-trips, reuse checks."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from myriad.data.config import DataConfig
from myriad.data.corpus import open_corpus
from myriad.data.tokenizer import (
    SPECIAL_TOKENS,
    joins_words,
    load_tokenizer,
    special_ids,
    train_tokenizer,
)
from myriad.errors import UserError

TEXT = "１９９８年新年讲话：中国人民决心继承邓小平同志的遗志。"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    corpus = open_corpus(DataConfig(max_documents=2000))
    train_tokenizer(corpus.documents(), 3000, path)
    return path


def test_cjk_split_per_character_and_specials(trained: Path):
    tokenizer = load_tokenizer(trained, 3000)
    assert tokenizer.get_vocab_size() <= 3000
    assert special_ids(tokenizer) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    encoding = tokenizer.encode("中华人民共和国成立")
    assert encoding.tokens == [
        "[CLS]",
        "中",
        "华",
        "人",
        "民",
        "共",
        "和",
        "国",
        "成",
        "立",
        "[SEP]",
    ]


def test_special_tokens_are_registered(trained: Path):
    """As in BERT's tokenizer.json: a written "[MASK]" is the mask token, and plain
    ``tokenizers`` decoding can skip the specials."""
    tokenizer = load_tokenizer(trained, 3000)
    encoding = tokenizer.encode("中国[MASK]民")
    assert encoding.tokens == ["[CLS]", "中", "国", "[MASK]", "民", "[SEP]"]
    assert encoding.ids[3] == 4
    assert tokenizer.decode(encoding.ids, skip_special_tokens=True).split() == ["中", "国", "民"]


def test_full_width_forms_fold_to_ascii(trained: Path):
    """People's Daily writes "１９９８" and "，"; reviews write "1998" and ",": one set of ids."""
    tokenizer = load_tokenizer(trained, 3000)
    full, half = tokenizer.encode("１９９８年，ＡＢ"), tokenizer.encode("1998年,AB")
    assert full.ids == half.ids and 1 not in full.ids  # 1 = [UNK]
    assert joins_words("Ａ") and joins_words("7") and not joins_words("中")
    assert not joins_words("，")


def test_vocab_never_exceeds_target(tmp_path: Path):
    corpus = open_corpus(DataConfig(max_documents=2000))
    tokenizer = train_tokenizer(corpus.documents(), 500, tmp_path / "t.json")  # < alphabet
    assert tokenizer.get_vocab_size() == 500


def test_loads_in_transformers_and_round_trips(trained: Path):
    fast = PreTrainedTokenizerFast(tokenizer_file=str(trained), **_hf_specials())
    ids = fast(TEXT)["input_ids"]
    assert ids[0] == fast.cls_token_id == 2 and ids[-1] == fast.sep_token_id == 3
    assert fast.unk_token_id not in ids
    decoded = str(fast.decode(ids, skip_special_tokens=True))
    # WordPiece decoding puts spaces between CJK chars; NFKC folded "１９９８" and "："
    assert "".join(decoded.split()) == unicodedata.normalize("NFKC", TEXT) != TEXT
    assert fast.pad_token_id == 0 and fast.mask_token_id == 4


def _hf_specials() -> dict[str, str]:
    return {f"{name}_token": tok for name, tok in SPECIAL_TOKENS.items()}


def test_reuse_errors(tmp_path: Path, trained: Path):
    with pytest.raises(UserError, match=r"data\.tokenizer.*nope\.json.*no such file"):
        load_tokenizer(tmp_path / "nope.json", 3000)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json.*not a readable tokenizer"):
        load_tokenizer(bad, 3000)
    with pytest.raises(UserError, match=r"tokenizer\.json.*more than model\.vocab_size = 100"):
        load_tokenizer(trained, 100)


def test_reuse_refuses_an_id_beyond_the_vocabulary(tmp_path: Path, trained: Path):
    """Few tokens, but ids with a gap: the largest id must fit the embedding table too."""
    spec = json.loads(trained.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    vocab[last] = 5000  # beyond vocab_size 3000, though the tokenizer still has <= 3000 tokens
    gapped = tmp_path / "gapped.json"
    gapped.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match=r"token id 5000 does not fit model\.vocab_size = 3000"):
        load_tokenizer(gapped, 3000)
