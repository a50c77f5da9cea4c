"""The MoE feed-forward layer: route, sort tokens by expert, run all experts as one grouped matmul.

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden,
A routed assignments (T*K, minus any dropped by a capacity limit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from myriad.model.config import MoEConfig
from myriad.model.layers import SwiGLU
from myriad.model.router import TopKRouter


@dataclass
class MoEOutput:
    """The layer's output plus what the trainer needs; travels by return value, never globals."""

    y: torch.Tensor
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor  # routed assignments per expert, before any drop
    dropped_fraction: torch.Tensor  # share of assignments dropped by the capacity limit


def _grouped_mm_reference(x_AD: torch.Tensor, w_EDN: torch.Tensor, offs_E: torch.Tensor):
    """Exact fallback for builds without a grouped matmul: one matmul per expert."""
    ends = offs_E.tolist()
    starts = [0, *ends[:-1]]
    outs = [x_AD[s:e] @ w_EDN[i] for i, (s, e) in enumerate(zip(starts, ends, strict=True))]
    return torch.cat(outs) if outs else x_AD.new_zeros(0, w_EDN.shape[-1])


def grouped_mm(x_AD: torch.Tensor, w_EDN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of ``x`` times ``w[e]``, for every expert e."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        return _grouped_mm_reference(x_AD, w_EDN, offs_E)
    return fn(x_AD, w_EDN, offs=offs_E.to(torch.int32))


class MoEFeedForward(nn.Module):
    """Dropless (or capacity-limited) top-k mixture of SwiGLU experts, plus optional shared experts."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, D, F_ = cfg.num_experts, d_model, cfg.d_expert
        self.router = TopKRouter(d_model, cfg)
        # Gate and up projections side by side: one grouped matmul computes both.
        self.w_in_EDF2 = nn.Parameter(torch.empty(E, D, 2 * F_))
        self.w_out_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.shared = (
            SwiGLU(d_model, cfg.num_shared_experts * F_) if cfg.num_shared_experts > 0 else None
        )

    def forward(self, x_TD: torch.Tensor) -> MoEOutput:
        routing = self.router(x_TD)
        T, K, E = x_TD.shape[0], self.cfg.top_k, self.cfg.num_experts
        expert_ids_A = routing.expert_ids_TK.flatten()
        order_A = torch.argsort(expert_ids_A, stable=True)
        counts_E = torch.bincount(expert_ids_A, minlength=E)
        dropped = x_TD.new_zeros((), dtype=torch.float32)
        if self.cfg.capacity_factor > 0:
            order_A, counts_kept_E = self._apply_capacity(order_A, expert_ids_A, counts_E, T)
            dropped = 1.0 - counts_kept_E.sum().float() / max(T * K, 1)
        else:
            counts_kept_E = counts_E
        token_A = order_A // K
        offs_E = torch.cumsum(counts_kept_E, dim=0)

        x_AD = x_TD[token_A]
        h_AF2 = grouped_mm(x_AD, self.w_in_EDF2, offs_E)
        gate_AF, up_AF = h_AF2.chunk(2, dim=-1)
        y_AD = grouped_mm(F.silu(gate_AF) * up_AF, self.w_out_EFD, offs_E)
        weight_A = routing.weights_TK.flatten()[order_A].to(y_AD.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_A, y_AD * weight_A[:, None])
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return MoEOutput(y_TD, routing.load_balance_loss, routing.z_loss, counts_E, dropped)

    def _apply_capacity(self, order_A, expert_ids_A, counts_E, num_tokens):
        """Keep, per expert, the first ``capacity`` assignments in token order; drop the rest."""
        cfg = self.cfg
        capacity = int(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts + 0.999999)
        starts_E = torch.cumsum(counts_E, dim=0) - counts_E
        sorted_ids_A = expert_ids_A[order_A]
        rank_in_expert_A = torch.arange(order_A.numel(), device=order_A.device) - starts_E[sorted_ids_A]
        keep_A = rank_in_expert_A < capacity
        return order_A[keep_A], counts_E.clamp(max=capacity)
