"""Expert parallelism: each rank holds E/N experts; tokens travel to them by all-to-all.

One MoE layer's expert computation, set from outside as the layer's ``expert_fn``. Assignments
are sorted by expert, so the rows for each rank are contiguous; a first all-to-all exchanges the
per-expert counts (so every rank knows how many rows it will receive, zero included: a rank or an
expert with no tokens still takes part in every exchange and never hangs), a second one the rows;
the local experts run on their rows with the model's own dispatch kernels; a third all-to-all
brings the outputs back, where they are weighted and summed per token. The backward of each
exchange is the reverse exchange.

Shape legend: T tokens, D model dim, K top-k, A = T*K assignments, E experts, L = E/N local
experts, N ranks, R rows received by this rank, F expert hidden.
"""

from __future__ import annotations

from typing import Any

import torch

from myriad.engine.comm import Comm
from myriad.model.moe import choose_strategy
from myriad.model.moe_dispatch import combine, dispatch, plan_dispatch, swiglu_experts


class _AllToAll(torch.autograd.Function):
    """Rows to ranks by ``in_splits``; receives ``out_splits``. Backward: the reverse."""

    @staticmethod
    def forward(ctx: Any, x_AD: torch.Tensor, comm: Comm, out_splits: list, in_splits: list):
        out_RD = x_AD.new_empty(sum(out_splits), x_AD.shape[1])
        comm.all_to_all(out_RD, x_AD.contiguous(), out_splits, in_splits)
        ctx.comm, ctx.splits = comm, (out_splits, in_splits)
        return out_RD

    @staticmethod
    def backward(ctx: Any, d_out_RD: torch.Tensor):
        out_splits, in_splits = ctx.splits
        d_in_AD = d_out_RD.new_empty(sum(in_splits), d_out_RD.shape[1])
        ctx.comm.all_to_all(d_in_AD, d_out_RD.contiguous(), in_splits, out_splits)
        return d_in_AD, None, None, None


class ExpertParallel:
    """Runs experts ``[rank*L, (rank+1)*L)`` here for the tokens of every rank."""

    def __init__(self, comm: Comm, num_experts: int) -> None:
        self.comm = comm
        self.num_experts = num_experts
        self.local = num_experts // comm.world
        self.max_groups = 1023

    def exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """(N, L) rows each source rank will send to each of this rank's experts."""
        n, local = self.comm.world, self.local
        recv_NL = torch.empty_like(counts_E)
        self.comm.all_to_all(recv_NL, counts_E, [local] * n, [local] * n)
        return recv_NL.view(n, local)

    def __call__(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        w_in_LDF2: torch.Tensor,
        w_out_LFD: torch.Tensor,
    ) -> torch.Tensor:
        T, K = expert_ids_TK.shape
        n, local = self.comm.world, self.local
        ids_A = expert_ids_TK.flatten()
        order_A = torch.argsort(ids_A, stable=True)
        counts_E = torch.bincount(ids_A, minlength=self.num_experts).to(torch.int64)
        recv_NL = self.exchange_counts(counts_E)
        send = counts_E.view(n, local).sum(1).tolist()
        recv = recv_NL.sum(1).tolist()

        x_AD = x_TD.index_select(0, order_A // K)  # sorted by expert, so by destination rank
        rows_RD = _AllToAll.apply(x_AD, self.comm, recv, send)
        # Received rows come by source rank, then by local expert within each source.
        if rows_RD.shape[0] == 0:
            # No tokens for any expert here: still in the graph, so this rank takes part in the
            # backward exchanges the other ranks will start.
            y_RD = rows_RD * 0.0
        else:
            y_RD = self.local_experts(rows_RD, recv_NL, w_in_LDF2, w_out_LFD)
        back_AD = _AllToAll.apply(y_RD, self.comm, send, recv)
        inverse_A = torch.empty_like(order_A)
        inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
        y_TKD = back_AD.index_select(0, inverse_A).view(T, K, -1)
        return (y_TKD * weights_TK.to(y_TKD.dtype).unsqueeze(-1)).sum(1)

    def local_experts(
        self,
        rows_RD: torch.Tensor,
        recv_NL: torch.Tensor,
        w_in_LDF2: torch.Tensor,
        w_out_LFD: torch.Tensor,
    ) -> torch.Tensor:
        """The local experts on the received rows (grouped by source rank, then by expert)."""
        n, local, device = self.comm.world, self.local, rows_RD.device
        local_ids_R = torch.arange(local, device=device).repeat(n)
        local_ids_R = local_ids_R.repeat_interleave(recv_NL.flatten().to(device))
        counts_L = recv_NL.sum(0).to(device)
        strategy = choose_strategy(rows_RD.shape[0], local, device, rows_RD.dtype)
        plan = plan_dispatch(local_ids_R[:, None], counts_L, strategy, 0, self.max_groups)
        y_rows = swiglu_experts(dispatch(rows_RD, plan), w_in_LDF2, w_out_LFD, plan.mm)
        return combine(y_rows, rows_RD.new_ones(rows_RD.shape[0], 1), plan)
