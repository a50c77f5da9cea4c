"""Typed configuration of the data pipeline; plain values only."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class CurriculumConfig:
    """Curriculum schedules (``data/curriculum.py``), both off by default; steps = optimizer steps.

    Sequence-length warm-up keeps the *tokens* per step: a batch of B rows of ``seq_len`` is cut
    into B * seq_len / s rows of length s, so the optimizer, the learning-rate schedule and the
    token budget see the same tokens in the same order, only with shorter context.
    """

    seq_len_start: int = 0  # first sequence length (must divide data.seq_len); 0: no warm-up
    seq_len_steps: int = 0  # steps over which it grows linearly (to divisors) to data.seq_len
    order: str = "none"  # "none", "length" (short documents first), "rarity" (common tokens first)
    order_start: float = 0.25  # competence at step 0: share of the easiest rows sampled from
    order_steps: int = 0  # steps until competence reaches 1 (sqrt schedule); then normal epochs


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
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
