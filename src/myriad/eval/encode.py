"""Examples -> token ids -> padded batches.

Each example is encoded once (``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``, truncated
longest-first to ``max_len``); batches are padded only to their own longest row.

Shape legend: B batch, S sequence (the batch's longest row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from myriad.eval.formats import Example, LabelMap


@dataclass
class Encoded:
    """One split, tokenized: ids per example and class indices (-1 where there is no label)."""

    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def encode_examples(
    tokenizer: Tokenizer, examples: list[Example], labels: LabelMap, max_len: int
) -> Encoded:
    """Tokenize a split with truncation to ``max_len`` tokens (specials included)."""
    tokenizer.enable_truncation(max_length=max_len, strategy="longest_first")
    tokenizer.no_padding()
    singles = [ex.text_a for ex in examples if ex.text_b is None]
    if len(singles) == len(examples):
        encodings = tokenizer.encode_batch(singles)
    else:
        encodings = tokenizer.encode_batch([(ex.text_a, ex.text_b or "") for ex in examples])
    ids = [enc.ids for enc in encodings]
    gold = [labels.to_index(ex.label) if ex.label is not None else -1 for ex in examples]
    return Encoded(ids=ids, labels=gold)


def make_batch(
    data: Encoded, rows: list[int], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """``input_ids`` (B, S), ``attention_mask`` (B, S, 1 = real token), ``labels`` (B,)."""
    width = max(len(data.ids[r]) for r in rows)
    input_ids_BS = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        seq = data.ids[r]
        input_ids_BS[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask_BS[i, : len(seq)] = 1
    labels_B = torch.tensor([data.labels[r] for r in rows], dtype=torch.long)
    return {
        "input_ids": input_ids_BS.to(device),
        "attention_mask": mask_BS.to(device),
        "labels": labels_B.to(device),
    }


def length_sorted_batches(data: Encoded, batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length: for inference, padding wastes least."""
    order = sorted(range(len(data)), key=lambda r: len(data.ids[r]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
