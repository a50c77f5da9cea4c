"""Routing statistics at each held-out evaluation, for every router type; token counts for init.

Shape legend: L MoE layers, E experts, K top-k, N probe tokens, V vocabulary.

Load balance is max over mean assignments per expert on the held-out batches. Routing churn is the
share of a fixed probe set of tokens (every token of the held-out batches, in context) whose top-1
expert changed since the previous evaluation, averaged over MoE layers (StableMoE's measure).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from myriad.model import MoETransformerLM
from myriad.train.device import AutocastFactory
from myriad.train.step import Batch

# At most this many training batches are read to count token frequencies for a balanced init.
MAX_COUNT_BATCHES = 2000


class _Stream(Protocol):
    def next_batch(self) -> Batch: ...


def token_counts(stream: _Stream, num_batches: int, vocab_size: int) -> torch.Tensor:
    """How often each id occurs as model *input* in ``num_batches`` batches (int64, (V,)).

    Counted on batches as the model sees them, so masked-LM's [MASK] is counted as often as it
    is fed. The caller passes a fresh stream: the training stream itself is not advanced.
    """
    counts_V = torch.zeros(vocab_size, dtype=torch.int64)
    for _ in range(num_batches):
        counts_V += torch.bincount(stream.next_batch()["input_ids"].flatten(), minlength=vocab_size)
    return counts_V


def count_batches(num_train_sequences: int, batch_size: int) -> int:
    """One epoch of training batches, capped at ``MAX_COUNT_BATCHES``."""
    return max(1, min(math.ceil(num_train_sequences / batch_size), MAX_COUNT_BATCHES))


def imbalance(load_E: torch.Tensor) -> float:
    """Max over mean assignments per expert (1.0 is perfect balance)."""
    mean = load_E.double().mean().item()
    return load_E.max().item() / mean if mean > 0 else 1.0


def churn(previous_LN: torch.Tensor, current_LN: torch.Tensor) -> list[float]:
    """Per MoE layer, the share of probe tokens whose top-1 expert changed."""
    return (previous_LN != current_LN).double().mean(dim=1).tolist()


def _top1(expert_ids_TK: torch.Tensor | None) -> torch.Tensor:
    if expert_ids_TK is None:
        raise ValueError("the MoE layer did not report its routing decision")
    return expert_ids_TK[:, 0]


class RoutingMonitor:
    """Measures load balance and churn on the held-out batches; remembers the last top-1 ids.

    Its state (the previous evaluation's top-1 experts) is saved with every checkpoint, so a
    resumed run reports the same churn as an unbroken one.
    """

    def __init__(self) -> None:
        self.previous_top1_LN: torch.Tensor | None = None

    @torch.no_grad()
    def measure(
        self,
        model: MoETransformerLM,
        batches: list[Batch],
        autocast: AutocastFactory,
        device: torch.device,
    ) -> dict[str, Any]:
        """Heldout-row fields; empty for a dense model. ``routing_churn`` is None the first time."""
        was_training = model.training
        model.eval()
        loads: list[torch.Tensor] = []
        top1: list[torch.Tensor] = []
        for batch in batches:
            with autocast():
                _, enc = model.encode(batch["input_ids"].to(device))
            outs = enc.moe_outs
            if not outs:
                break
            load_LE = torch.stack([o.tokens_per_expert_E for o in outs]).cpu()
            loads.append(load_LE)
            top1.append(torch.stack([_top1(o.expert_ids_TK) for o in outs]).cpu())
        model.train(was_training)
        if not loads:
            return {}
        load_LE = torch.stack(loads).sum(dim=0)
        top1_LN = torch.cat(top1, dim=1)
        per_layer = [imbalance(load_E) for load_E in load_LE]
        row: dict[str, Any] = {
            "expert_load_max_over_mean": max(per_layer),
            "expert_load_max_over_mean_per_layer": per_layer,
            "routing_churn": None,
            "routing_churn_per_layer": None,
        }
        if self.previous_top1_LN is not None and self.previous_top1_LN.shape == top1_LN.shape:
            per_layer_churn = churn(self.previous_top1_LN, top1_LN)
            row["routing_churn"] = sum(per_layer_churn) / len(per_layer_churn)
            row["routing_churn_per_layer"] = per_layer_churn
        self.previous_top1_LN = top1_LN
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"previous_top1_LN": self.previous_top1_LN}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.previous_top1_LN = None if state is None else state["previous_top1_LN"]
