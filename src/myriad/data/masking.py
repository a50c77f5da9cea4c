"""Training targets: BERT masked-LM corruption (token or whole-word) and causal-LM labels.

Legend: ``B`` batch, ``S`` sequence length. ``input_ids_BS`` / ``labels_BS`` are int64;
``word_starts_BS`` is bool. Label ``-100`` means "no loss here" (PyTorch's ``ignore_index``).

All randomness comes from an explicit ``torch.Generator`` so a batch is a pure function of
(tokens, seed): the loader derives the seed from (run seed, epoch, position) and a resumed
run reproduces every mask bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True, kw_only=True)
class MaskingSpec:
    """What a masker needs to know about the vocabulary; built once per run.

    Attributes:
        mask_prob: share of eligible (non-special) tokens chosen for prediction.
        mask_id: id of [MASK].
        pad_id: id of [PAD] (never a target, in either objective).
        special_ids: every special id ([PAD], [UNK], [CLS], [SEP], [MASK]): never chosen.
        vocab_size: ids are ``< vocab_size``.
        whole_word: choose words rather than tokens; all pieces of a chosen word are targets.
    """

    mask_prob: float
    mask_id: int
    pad_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    whole_word: bool = False

    def random_pool(self) -> torch.Tensor:
        """Ids a "random token" replacement is drawn from: the vocabulary minus the specials."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[list(self.special_ids)] = False
        return keep.nonzero().squeeze(1)


def _select(
    input_ids_BS: torch.Tensor,
    word_starts_BS: torch.Tensor | None,
    spec: MaskingSpec,
    generator: torch.Generator,
) -> torch.Tensor:
    """Bool ``(B, S)``: positions chosen for prediction."""
    eligible_BS = ~torch.isin(input_ids_BS, torch.tensor(spec.special_ids))
    draw_BS = torch.rand(input_ids_BS.shape, generator=generator) < spec.mask_prob
    if not spec.whole_word or word_starts_BS is None:
        return eligible_BS & draw_BS
    # Decide at each word's first eligible token (a word may open with [UNK]), then copy the
    # decision to the word's later pieces. cummax over positions finds, for every s, the
    # latest word start and the latest decision point at or before s.
    S = input_ids_BS.shape[1]
    positions_BS = torch.arange(S).expand_as(input_ids_BS)
    starts_BS = word_starts_BS.bool().clone()
    starts_BS[:, 0] = True
    start_pos_BS = torch.cummax(torch.where(starts_BS, positions_BS, 0), dim=1).values
    last_eligible_BS = torch.cummax(torch.where(eligible_BS, positions_BS, -1), dim=1).values
    before_BS = torch.nn.functional.pad(last_eligible_BS[:, :-1], (1, 0), value=-1)
    decides_BS = eligible_BS & (before_BS < start_pos_BS)
    decision_pos_BS = torch.cummax(torch.where(decides_BS, positions_BS, 0), dim=1).values
    word_chosen_BS = (eligible_BS & draw_BS).gather(1, decision_pos_BS)
    return word_chosen_BS & eligible_BS


def mask_tokens(
    input_ids_BS: torch.Tensor,
    spec: MaskingSpec,
    generator: torch.Generator,
    word_starts_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT corruption: of the chosen positions 80 % -> [MASK], 10 % -> random, 10 % kept.

    Selection is a Bernoulli draw per token (or per word with ``spec.whole_word``), so the
    expected share of targets is ``mask_prob`` among non-special tokens, as in Hugging Face's
    ``DataCollatorForLanguageModeling``.

    Args:
        input_ids_BS: int64 ``(B, S)`` token ids; not modified.
        spec: vocabulary facts and the masking probability.
        generator: the only source of randomness.
        word_starts_BS: ``(B, S)`` flags, 1 where a word begins; needed for whole-word masking.

    Returns:
        ``(inputs_BS, labels_BS)``: the corrupted ids, and the original id at chosen
        positions with -100 elsewhere; both int64 ``(B, S)``.
    """
    chosen_BS = _select(input_ids_BS, word_starts_BS, spec, generator)
    labels_BS = torch.where(chosen_BS, input_ids_BS, IGNORE_INDEX)
    action_BS = torch.rand(input_ids_BS.shape, generator=generator)
    pool = spec.random_pool()
    random_ids_BS = pool[torch.randint(len(pool), input_ids_BS.shape, generator=generator)]
    inputs_BS = input_ids_BS.clone()
    inputs_BS = torch.where(chosen_BS & (action_BS < 0.8), spec.mask_id, inputs_BS)
    to_random_BS = chosen_BS & (action_BS >= 0.8) & (action_BS < 0.9)
    inputs_BS = torch.where(to_random_BS, random_ids_BS, inputs_BS)
    return inputs_BS, labels_BS


def causal_labels(input_ids_BS: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM: labels are the inputs (the model shifts them), -100 on padding only."""
    labels_BS = torch.where(input_ids_BS == pad_id, IGNORE_INDEX, input_ids_BS)
    return input_ids_BS.clone(), labels_BS
