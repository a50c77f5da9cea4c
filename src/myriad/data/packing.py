"""Tokenize a corpus, streaming, into fixed-length sequences stored on disk with a JSON sidecar.

Scheme (the same for masked and causal LM, so one cache serves both)::

    stream   = doc_1 [SEP] doc_2 [SEP] ... doc_n [SEP]
    sequence = [CLS] + the next (seq_len - 1) tokens of the stream

Every sequence starts with [CLS] (the encoder's summary token; a BOS for a decoder) and a
document may continue into the next sequence. The final sequence is padded with [PAD] so no
token is dropped; padding carries label -100. Removing [CLS], [SEP] and [PAD] from the
concatenated sequences gives back exactly the tokenized documents.

Files in the cache folder (``S`` = seq_len, ``N`` = sequences):

* ``ids.bin``: ``(N, S)`` token ids, ``uint16`` when the vocabulary has at most 65,535
  tokens, else ``uint32``; raw C-order bytes, read with ``np.memmap``.
* ``word_starts.bin``: ``(N, S)`` ``uint8``, 1 where a token begins a word (for whole-word
  masking): from gold segmentation where the corpus has it, else every token that is not a
  ``##`` continuation piece. Specials and the first token after [CLS] are always 1.
* ``meta.json``: counts, dtype, vocabulary size, tokenizer hash, corpus fingerprint.

The folder is written under a temporary name and renamed into place, so a crash never
leaves a cache that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from myriad.data.corpus import Corpus
from myriad.data.tokenizer import special_ids

FORMAT_VERSION = 1
_ENCODE_BATCH_DOCS = 512
Progress = Callable[[str], None]


@dataclass(frozen=True)
class PackedCorpus:
    """A packed cache opened for reading; arrays are memory-mapped, not loaded.

    Attributes:
        ids_NS: token ids, ``(N, S)``, uint16 or uint32.
        word_starts_NS: word-start flags, ``(N, S)``, uint8.
        meta: the sidecar (``num_tokens``, ``num_sequences``, ``vocab_size``, ...).
    """

    ids_NS: np.ndarray
    word_starts_NS: np.ndarray
    meta: dict[str, Any]


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: halves disk and page cache for <64k vocabs."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def open_packed(folder: Path) -> PackedCorpus:
    """Memory-map a finished cache folder."""
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    shape = (meta["num_sequences"], meta["seq_len"])
    ids = np.memmap(folder / "ids.bin", dtype=meta["dtype"], mode="r", shape=shape)
    starts = np.memmap(folder / "word_starts.bin", dtype=np.uint8, mode="r", shape=shape)
    return PackedCorpus(ids_NS=ids, word_starts_NS=starts, meta=meta)


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while batch := list(islice(items, size)):
        yield batch


def _gold_word_starts(encoding: Encoding, words: list[str]) -> np.ndarray:
    """1 for tokens whose first character begins a gold word (offsets index the raw text)."""
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    boundary = np.zeros(int(lengths.sum()) + 1, dtype=bool)
    boundary[np.cumsum(lengths) - lengths] = True
    starts = np.fromiter((o[0] for o in encoding.offsets), dtype=np.int64, count=len(encoding))
    return boundary[starts].astype(np.uint8)


class _Packer:
    """Turns a stream of tokenized documents into ``(rows, S)`` blocks appended to two files."""

    def __init__(self, folder: Path, seq_len: int, dtype: np.dtype, cls_id: int, pad_id: int):
        self.seq_len, self.dtype, self.cls_id, self.pad_id = seq_len, dtype, cls_id, pad_id
        self.ids_file = (folder / "ids.bin").open("wb")
        self.starts_file = (folder / "word_starts.bin").open("wb")
        self.carry_ids = np.zeros(0, dtype=dtype)
        self.carry_starts = np.zeros(0, dtype=np.uint8)
        self.num_sequences = 0

    def add(self, ids: list[np.ndarray], starts: list[np.ndarray]) -> None:
        """Append documents (each already ending in [SEP]); write every full sequence."""
        all_ids = np.concatenate([self.carry_ids, *ids])
        all_starts = np.concatenate([self.carry_starts, *starts])
        body = self.seq_len - 1
        rows = len(all_ids) // body
        self._write(all_ids[: rows * body], all_starts[: rows * body], rows)
        self.carry_ids, self.carry_starts = all_ids[rows * body :], all_starts[rows * body :]

    def _write(self, ids: np.ndarray, starts: np.ndarray, rows: int) -> None:
        if rows == 0:
            return
        ids_RS = np.empty((rows, self.seq_len), dtype=self.dtype)
        ids_RS[:, 0] = self.cls_id
        ids_RS[:, 1:] = ids.reshape(rows, -1)
        starts_RS = np.ones((rows, self.seq_len), dtype=np.uint8)
        starts_RS[:, 2:] = starts.reshape(rows, -1)[:, 1:]  # a row never opens mid-word
        self.ids_file.write(ids_RS.tobytes())
        self.starts_file.write(starts_RS.tobytes())
        self.num_sequences += rows

    def close(self) -> None:
        """Pad and write the partial last sequence, then close the files."""
        tail = len(self.carry_ids)
        if tail:
            pad = self.seq_len - 1 - tail
            ids = np.concatenate([self.carry_ids, np.full(pad, self.pad_id, self.dtype)])
            starts = np.concatenate([self.carry_starts, np.ones(pad, np.uint8)])
            self._write(ids, starts, 1)
        self.discard()

    def discard(self) -> None:
        """Close the files (on failure, without writing the partial sequence)."""
        self.ids_file.close()
        self.starts_file.close()


def pack_corpus(
    corpus: Corpus,
    tokenizer: Tokenizer,
    folder: Path,
    *,
    seq_len: int,
    meta: dict[str, Any],
    progress: Progress | None = None,
) -> PackedCorpus:
    """Tokenize ``corpus`` in batches (``encode_batch``) and write the cache to ``folder``.

    Args:
        corpus: the documents; read once, streaming.
        tokenizer: encodes without its post-processor; [CLS]/[SEP] are placed here.
        folder: the final cache folder; built as ``folder.tmp-<pid>`` then renamed.
        seq_len: tokens per sequence, [CLS] included (>= 2).
        meta: identity fields stored in the sidecar (tokenizer hash, corpus fingerprint...).
        progress: called with a short line every few thousand documents.

    Returns:
        The opened cache.
    """
    specials = special_ids(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    packer = _Packer(tmp, seq_len, dtype, specials["cls"], specials["pad"])
    try:
        num_docs, num_doc_tokens = _pack_documents(corpus, tokenizer, packer, progress)
        packer.close()
    except BaseException:  # a bad document or an interrupt: leave no partial cache behind
        packer.discard()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sidecar = {
        **meta,
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "num_documents": num_docs,
        "num_tokens": num_doc_tokens,  # document tokens, without [CLS]/[SEP]/[PAD]
        "num_sequences": packer.num_sequences,
    }
    (tmp / "meta.json").write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return open_packed(folder)


def _pack_documents(
    corpus: Corpus, tokenizer: Tokenizer, packer: _Packer, progress: Progress | None
) -> tuple[int, int]:
    """Encode every document into ``packer``; returns (documents, document tokens)."""
    is_piece = np.zeros(tokenizer.get_vocab_size(), dtype=bool)
    is_piece[[i for tok, i in tokenizer.get_vocab().items() if tok.startswith("##")]] = True
    dtype = packer.dtype
    sep_ids, one = np.array([special_ids(tokenizer)["sep"]], dtype=dtype), np.ones(1, np.uint8)
    items = corpus.word_lists() if corpus.has_gold_words else corpus.documents()
    num_docs = num_doc_tokens = 0
    for batch in _batched(items, _ENCODE_BATCH_DOCS):
        texts = ["".join(b) for b in batch] if corpus.has_gold_words else batch
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        ids, starts = [], []
        for item, enc in zip(batch, encodings, strict=True):
            doc_ids = np.asarray(enc.ids, dtype=dtype)
            if corpus.has_gold_words:
                doc_starts = _gold_word_starts(enc, item)
            else:
                doc_starts = (~is_piece[doc_ids]).astype(np.uint8)
            ids += [doc_ids, sep_ids]
            starts += [doc_starts, one]
            num_doc_tokens += len(doc_ids)
        packer.add(ids, starts)
        num_docs += len(batch)
        if progress and num_docs % (8 * _ENCODE_BATCH_DOCS) < len(batch):
            progress(f"packed {num_docs:,} documents, {num_doc_tokens:,} tokens")
    return num_docs, num_doc_tokens
