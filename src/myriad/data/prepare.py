"""The data pipeline's one entry point: corpus -> tokenizer -> packed cache -> batch streams.

Layout under ``out_dir``::

    tokenizer.json                   trained here, or a copy of data.tokenizer
    data/tokenizer.meta.json         what a trained tokenizer was trained on (for reuse)
    data/packed-<key>/ids.bin        (N, S) token ids        } see packing.py
    data/packed-<key>/word_starts.bin                         }
    data/packed-<key>/meta.json      sidecar

``<key>`` hashes everything the packed tokens depend on (corpus fingerprint, tokenizer
bytes, seq_len, format version), so a re-run with the same inputs reuses the cache and a
changed input builds a new one next to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from myriad.data import curriculum as curriculum_mod
from myriad.data.config import CurriculumConfig, DataConfig
from myriad.data.corpus import Corpus, open_corpus
from myriad.data.loader import Batch, BatchStream, TargetMaker, heldout_batches
from myriad.data.masking import MaskingSpec
from myriad.data.packing import FORMAT_VERSION, PackedCorpus, open_packed, pack_corpus
from myriad.data.tokenizer import file_hash, load_tokenizer, special_ids, train_tokenizer
from myriad.errors import UserError

logger = logging.getLogger("myriad.data")
Progress = Callable[[str], None]


@dataclass
class PreparedData:
    """A packed corpus ready for training; cheap to hold (arrays are memory-mapped).

    Attributes:
        tokenizer_path: ``out_dir/tokenizer.json``.
        vocab_size: the tokenizer's actual size (<= the model's ``vocab_size``).
        num_train_sequences: sequences in the training split (none shares a document with a
            held-out one, unless the corpus is too small to keep them apart).
        num_heldout_sequences: sequences kept out for held-out loss (>= 1).
        num_tokens: document tokens in the corpus ([CLS]/[SEP]/[PAD] not counted).
        special_ids: ``pad``, ``unk``, ``cls``, ``sep``, ``mask`` -> id.
        seq_len: tokens per sequence.
        objective: ``"mlm"`` or ``"clm"``; decides the labels.
        cache_dir: the packed cache folder.
        data_key: identifies the packed data (the resume guard checks it).
    """

    tokenizer_path: Path
    vocab_size: int
    num_train_sequences: int
    num_heldout_sequences: int
    num_tokens: int
    special_ids: dict[str, int]
    seq_len: int
    objective: str
    cache_dir: Path
    data_key: str
    _packed: PackedCorpus = field(repr=False)
    _train_rows: np.ndarray = field(repr=False)
    _heldout_rows: np.ndarray = field(repr=False)
    _targets: TargetMaker = field(repr=False)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def train_stream(self, batch_size: int, seed: int) -> BatchStream:
        """An endless, resumable stream of training batches (see :class:`BatchStream`)."""
        return BatchStream(
            self._packed.ids_NS,
            self._packed.word_starts_NS,
            self._train_rows.tolist(),
            batch_size=batch_size,
            seed=seed,
            make_targets=self._targets,
            data_key=self.data_key,
        )

    def curriculum_stream(
        self, base: BatchStream, batches_per_step: int
    ) -> curriculum_mod.CurriculumStream:
        """``base`` with ``data.curriculum``'s schedules applied (see ``curriculum.py``)."""
        cfg, train_rows = self.curriculum, self._train_rows
        if cfg.order != "none":
            specials = list(self.special_ids.values())
            scores_N = curriculum_mod.difficulty_scores(
                self._packed.ids_NS, cfg.order, self.special_ids["sep"], specials
            )
            train_rows = curriculum_mod.rank_rows(scores_N, train_rows)
        return curriculum_mod.CurriculumStream(
            base,
            cfg,
            ids_NS=self._packed.ids_NS,
            starts_NS=self._packed.word_starts_NS,
            ranked_rows=train_rows,
            make_targets=self._targets,
            batches_per_step=batches_per_step,
        )

    def heldout_batches(self, batch_size: int, max_batches: int, seed: int) -> list[Batch]:
        """The same evaluation batches every call with the same arguments (fixed masks)."""
        return heldout_batches(
            self._packed.ids_NS,
            self._packed.word_starts_NS,
            self._heldout_rows.tolist(),
            batch_size=batch_size,
            max_batches=max_batches,
            seed=seed,
            make_targets=self._targets,
        )

    @property
    def train_rows(self) -> np.ndarray:
        """Row numbers of the training sequences in the cache (for inspection and tests)."""
        return self._train_rows

    @property
    def heldout_rows(self) -> np.ndarray:
        """Row numbers of the held-out sequences in the cache."""
        return self._heldout_rows


def heldout_split(num_sequences: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Evenly spaced held-out rows: ``max(1, round(N * fraction))`` of them, seed-independent.

    Spreading them over the corpus (rather than taking the tail) samples every part of it
    (all days of the month for zh-news); not depending on the seed keeps held-out loss
    comparable across runs.
    """
    count = min(max(1, round(num_sequences * fraction)), num_sequences - 1)
    heldout = np.floor((np.arange(count) + 0.5) * num_sequences / count).astype(np.int64)
    train = np.setdiff1d(np.arange(num_sequences, dtype=np.int64), heldout)
    return train, heldout


def sharing_rows(ids_NS: np.ndarray, rows: np.ndarray, sep_id: int) -> np.ndarray:
    """Rows not in ``rows`` that hold part of a document that also lies in one of ``rows``.

    Documents run across sequence boundaries, so the neighbours of a held-out row usually hold
    the rest of its documents; training on them would let held-out loss see trained context.
    Reads only the rows it walks.
    """
    n, found = len(ids_NS), set()

    def runs_on(r: int) -> bool:  # row r's last document has tokens in row r + 1
        return bool(ids_NS[r, -1] != sep_id and ids_NS[r + 1, 1] != sep_id)

    def ends_a_document(r: int) -> bool:  # so the walk stops at row r
        return bool((ids_NS[r, 1:] == sep_id).any())

    for row in rows.tolist():
        r = row
        while r + 1 < n and runs_on(r):
            r += 1
            found.add(r)
            if ends_a_document(r):
                break
        r = row
        while r > 0 and runs_on(r - 1):
            r -= 1
            found.add(r)
            if ends_a_document(r):
                break
    return np.setdiff1d(np.fromiter(found, np.int64, len(found)), rows)


def _validate(cfg: DataConfig, vocab_size: int, objective: str) -> None:
    checks = [
        (objective in ("mlm", "clm"), f"model.objective must be 'mlm' or 'clm', got {objective!r}"),
        (cfg.seq_len >= 2, f"data.seq_len must be >= 2, got {cfg.seq_len}"),
        (
            0.0 <= cfg.heldout_fraction < 1.0,
            f"data.heldout_fraction must be in [0, 1), got {cfg.heldout_fraction}",
        ),
        (0.0 < cfg.mask_prob < 1.0, f"data.mask_prob must be in (0, 1), got {cfg.mask_prob}"),
        (vocab_size > 0, f"model.vocab_size must be > 0, got {vocab_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    curriculum_mod.validate(cfg.curriculum, cfg.seq_len)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _obtain_tokenizer(
    cfg: DataConfig, corpus: Corpus, vocab_size: int, out_dir: Path, report: Progress
) -> Path:
    """Copy ``data.tokenizer``, reuse a tokenizer trained on the same corpus, or train one."""
    path = out_dir / "tokenizer.json"
    if cfg.tokenizer:
        source = Path(cfg.tokenizer).expanduser()
        load_tokenizer(source, vocab_size)  # validates before anything is written
        if not path.exists() or not path.samefile(source):
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)
        report(f"using tokenizer {source}")
        return path
    sidecar = out_dir / "data" / "tokenizer.meta.json"
    # No trainer version in the key: a run folder keeps the tokenizer it started with, so a
    # --resume after an upgrade goes on with the vocabulary its weights learnt.
    wanted = {"corpus": corpus.describe(), "vocab_size": vocab_size, "version": FORMAT_VERSION}
    if path.is_file() and sidecar.is_file():
        saved = json.loads(sidecar.read_text(encoding="utf-8"))
        if saved.get("inputs") == wanted and saved.get("sha256") == file_hash(path):
            report(f"reusing tokenizer {path}")
            return path
    start = time.perf_counter()
    train_tokenizer(corpus.documents(), vocab_size, path)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    record = {"inputs": wanted, "sha256": file_hash(path)}
    sidecar.write_text(json.dumps(record, indent=1), encoding="utf-8")
    report(f"trained tokenizer in {time.perf_counter() - start:.1f}s -> {path}")
    return path


def prepare_data(
    cfg: DataConfig,
    *,
    vocab_size: int,
    objective: str,
    out_dir: Path,
    seed: int,
    progress: Progress | None = None,
) -> PreparedData:
    """Trains or loads the tokenizer (saved to out_dir/'tokenizer.json'), tokenizes and packs
    the corpus into a cache under out_dir/'data' (reused when inputs are unchanged), splits
    held-out. Raises UserError on bad input.

    Args:
        cfg: the recipe's ``[data]`` section.
        vocab_size: the model's embedding rows; the tokenizer never exceeds it.
        objective: ``"mlm"`` (masked, BERT 80/10/10) or ``"clm"`` (causal).
        out_dir: the run folder.
        seed: the run seed. The cache and held-out split do not depend on it (so runs with
            different seeds share them); batch order and masks take their seed from
            ``train_stream`` / ``heldout_batches``.
        progress: called with one-line status messages (also logged to ``myriad.data``).
    """

    def report(message: str) -> None:
        logger.info(message)
        if progress is not None:
            progress(message)

    del seed  # accepted for the contract; see Args
    _validate(cfg, vocab_size, objective)
    out_dir = Path(out_dir)
    corpus = open_corpus(cfg)
    tokenizer_path = _obtain_tokenizer(cfg, corpus, vocab_size, out_dir, report)
    tokenizer = load_tokenizer(tokenizer_path, vocab_size, key="tokenizer")
    inputs = {
        "version": FORMAT_VERSION,
        "corpus": corpus.describe(),
        "tokenizer_sha256": file_hash(tokenizer_path),
        "seq_len": cfg.seq_len,
    }
    data_key = _hash(inputs)[:16]
    cache_dir = out_dir / "data" / f"packed-{data_key}"
    if (cache_dir / "meta.json").is_file():
        packed = open_packed(cache_dir)
        report(f"reusing packed data {cache_dir}")
    else:
        start = time.perf_counter()
        packed = pack_corpus(
            corpus,
            tokenizer,
            cache_dir,
            seq_len=cfg.seq_len,
            meta={"inputs": inputs},
            progress=report,
        )
        report(f"packed corpus in {time.perf_counter() - start:.1f}s -> {cache_dir}")
    meta = packed.meta
    if meta["num_sequences"] < 2:
        raise UserError(
            f"data.corpus = {cfg.corpus!r}: only {meta['num_sequences']} sequence of "
            f"data.seq_len = {cfg.seq_len} tokens; need at least 2 (one is held out)"
        )
    train_rows, heldout_rows = heldout_split(meta["num_sequences"], cfg.heldout_fraction)
    ids = special_ids(tokenizer)
    shared = sharing_rows(packed.ids_NS, heldout_rows, ids["sep"])
    if len(shared) < len(train_rows):
        train_rows = np.setdiff1d(train_rows, shared)
        guard = f"; {len(shared):,} sharing a document with held-out ones left out"
    else:  # a corpus of one long document: keep training on it, and say so
        guard = "; held-out sequences share documents with training ones (too few documents)"
    spec = MaskingSpec(
        mask_prob=cfg.mask_prob,
        mask_id=ids["mask"],
        pad_id=ids["pad"],
        special_ids=tuple(sorted(ids.values())),
        vocab_size=tokenizer.get_vocab_size(),
        whole_word=cfg.whole_word_mask,
    )
    report(
        f"{meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens, "
        f"{len(train_rows):,} train + {len(heldout_rows):,} held-out sequences of {cfg.seq_len}"
        f"{guard}"
    )
    return PreparedData(
        tokenizer_path=tokenizer_path,
        vocab_size=tokenizer.get_vocab_size(),
        num_train_sequences=len(train_rows),
        num_heldout_sequences=len(heldout_rows),
        num_tokens=int(meta["num_tokens"]),
        special_ids=ids,
        seq_len=cfg.seq_len,
        objective=objective,
        cache_dir=cache_dir,
        data_key=data_key,
        _packed=packed,
        _train_rows=train_rows,
        _heldout_rows=heldout_rows,
        _targets=TargetMaker(objective, spec),
        curriculum=cfg.curriculum,
    )
