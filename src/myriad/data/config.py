"""Typed configuration of the data pipeline; plain values only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class DataConfig:
    """Where text comes from, how it is tokenized, packed and masked."""

    corpus: str = "zh-news"  # a built-in corpus name, or a path / glob of .txt, .jsonl, .parquet
    format: str = "auto"  # "auto" (by extension), "text", "jsonl" or "parquet"
    text_field: str = "text"  # the field holding the text in JSON lines and Parquet files
    tokenizer: str = ""  # an existing tokenizer.json to reuse; empty trains one on the corpus
    seq_len: int = 128  # tokens per packed sequence
    heldout_fraction: float = 0.01  # share of packed sequences kept out of training
    mask_prob: float = 0.15  # masked-LM: share of tokens chosen for prediction (80/10/10)
    whole_word_mask: bool = False  # masked-LM: mask all pieces of a word together
    max_documents: int = 0  # read at most this many documents; 0 reads the whole corpus
