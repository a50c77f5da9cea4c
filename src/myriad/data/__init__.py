"""Data pipeline: corpora -> WordPiece tokenizer -> packed, cached sequences -> batch streams.

The trainer needs only :func:`prepare_data`; see ``docs/data.md`` for formats and caching.
"""

from myriad.data.config import DataConfig
from myriad.data.corpus import Corpus, open_corpus
from myriad.data.loader import BatchStream
from myriad.data.masking import IGNORE_INDEX, MaskingSpec, causal_labels, mask_tokens
from myriad.data.prepare import PreparedData, prepare_data

__all__ = [
    "IGNORE_INDEX",
    "BatchStream",
    "Corpus",
    "DataConfig",
    "MaskingSpec",
    "PreparedData",
    "causal_labels",
    "mask_tokens",
    "open_corpus",
    "prepare_data",
]
