"""Masking statistics against their binomial expectations; whole words; causal labels."""

from __future__ import annotations

import math

import torch

from myriad.data.masking import IGNORE_INDEX, MaskingSpec, causal_labels, mask_tokens

V = 1000
SPECIALS = (0, 1, 2, 3, 4)


def _spec(whole_word: bool = False, p: float = 0.15) -> MaskingSpec:
    return MaskingSpec(
        mask_prob=p, mask_id=4, pad_id=0, special_ids=SPECIALS, vocab_size=V, whole_word=whole_word
    )


def _ids(shape=(64, 512), seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, shape, generator=g)
    ids[:, 0] = 2
    ids[:, ::37] = 3
    ids[:, -20:] = 0
    return ids


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_token_masking_statistics():
    ids = _ids()
    inputs, labels = mask_tokens(ids, _spec(), torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(SPECIALS))
    chosen = labels != IGNORE_INDEX
    assert not (chosen & special).any()  # specials (incl. [PAD]) are never targets
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing outside the selection changes
    n_eligible, n_chosen = int((~special).sum()), int(chosen.sum())
    assert _within(n_chosen, n_eligible, 0.15)
    masked = int((inputs[chosen] == 4).sum())
    kept = int((inputs[chosen] == ids[chosen]).sum())
    randomised = n_chosen - masked - kept
    assert _within(masked, n_chosen, 0.8)
    assert _within(kept, n_chosen, 0.1 + 0.1 / (V - 5))  # a random draw can hit the original
    assert _within(randomised, n_chosen, 0.1 - 0.1 / (V - 5))
    replaced = inputs[chosen & (inputs != ids) & (inputs != 4)]
    assert replaced.min() >= 5 and replaced.max() < V  # random tokens are never specials


def test_deterministic_from_generator():
    ids = _ids((8, 64))
    a = mask_tokens(ids, _spec(), torch.Generator().manual_seed(7))
    b = mask_tokens(ids, _spec(), torch.Generator().manual_seed(7))
    c = mask_tokens(ids, _spec(), torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_whole_word_masking():
    ids = _ids((32, 512), seed=3)
    g = torch.Generator().manual_seed(5)
    starts = torch.rand(ids.shape, generator=g) < 0.4  # words of ~2.5 pieces
    special = torch.isin(ids, torch.tensor(SPECIALS))
    starts |= special
    starts[:, 1:] |= special[:, :-1]  # a special is a word of its own, as the loader marks it
    starts[:, 0] = True
    _, labels = mask_tokens(ids, _spec(whole_word=True), torch.Generator().manual_seed(0), starts)
    chosen = labels != IGNORE_INDEX
    word_id = torch.cumsum(starts.long(), dim=1)
    n_words = n_chosen_words = 0
    for b in range(ids.shape[0]):
        for w in torch.unique(word_id[b]).tolist():
            piece = chosen[b][word_id[b] == w]
            assert piece.all() or not piece.any(), "a word was partly masked"
            special = torch.isin(ids[b][word_id[b] == w], torch.tensor(SPECIALS)).all()
            if not special:
                n_words += 1
                n_chosen_words += int(piece.all())
    assert _within(n_chosen_words, n_words, 0.15)
    assert (chosen & ~starts).any()  # continuation pieces do get masked


def test_word_opening_with_unk_is_still_masked_whole():
    # [UNK] (id 1) is never a target, but the pieces after it in the same word are, together.
    ids = torch.tensor([[2, 1, 50, 51, 60]]).repeat(4000, 1)
    starts = torch.tensor([[True, True, False, False, True]]).repeat(4000, 1)
    _, labels = mask_tokens(ids, _spec(whole_word=True), torch.Generator().manual_seed(0), starts)
    chosen = labels != IGNORE_INDEX
    assert not chosen[:, :2].any()
    assert torch.equal(chosen[:, 2], chosen[:, 3])
    assert _within(int(chosen[:, 2].sum()), 4000, 0.15)
    assert _within(int(chosen[:, 4].sum()), 4000, 0.15)


def test_causal_labels():
    ids = torch.tensor([[2, 10, 11, 3, 0, 0]])
    inputs, labels = causal_labels(ids, pad_id=0)
    assert torch.equal(inputs, ids)
    assert labels.tolist() == [[2, 10, 11, 3, IGNORE_INDEX, IGNORE_INDEX]]
