"""Top-k softmax router with its balancing terms; router math runs in fp32.

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from myriad.model.config import MoEConfig


@dataclass
class Routing:
    """Which experts each token goes to, with what weight, and the balancing losses."""

    weights_TK: torch.Tensor  # fp32 combine weights
    expert_ids_TK: torch.Tensor  # int64
    load_balance_loss: torch.Tensor  # Switch loss, unscaled (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # mean squared log-partition of the router logits, unscaled
    counts_E: torch.Tensor  # int64 assignments per expert (before any capacity drop)


class TopKRouter(nn.Module):
    """Scores experts from the hidden state and picks the top k per token.

    With ``bias_update_rate > 0`` a per-expert bias (DeepSeek-V3's auxiliary-loss-free balancing)
    shifts which experts are *selected*, never the weights they are combined with; the trainer
    nudges it after each step through :meth:`update_bias`.
    """

    selection_bias_E: torch.Tensor

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.norm_topk = cfg.norm_topk
        self.bias_update_rate = cfg.bias_update_rate
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        self.register_buffer("selection_bias_E", torch.zeros(cfg.num_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        scores_TE = probs_TE
        if self.bias_update_rate > 0:
            scores_TE = probs_TE + self.selection_bias_E
        expert_ids_TK = scores_TE.topk(self.top_k, dim=-1).indices
        weights_TK = probs_TE.gather(1, expert_ids_TK)
        if self.norm_topk and self.top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)

        num_tokens = x_TD.shape[0]
        # scatter_add, unlike bincount, needs no host sync on CUDA.
        ids_A = expert_ids_TK.flatten()
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=ids_A.device)
        counts_E.scatter_add_(0, ids_A, torch.ones_like(ids_A))
        fraction_E = counts_E.float() / max(num_tokens * self.top_k, 1)
        load_balance_loss = self.num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
        return Routing(weights_TK, expert_ids_TK, load_balance_loss, z_loss, counts_E)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones."""
        if self.bias_update_rate <= 0:
            return
        load_E = tokens_per_expert_E.float().to(self.selection_bias_E.device)
        self.selection_bias_E += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
