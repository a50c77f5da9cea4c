"""Expert parallelism: each rank of an EP group holds E/k experts; tokens reach them by all-to-all.

One MoE layer's expert computation, set from outside as the layer's ``expert_fn``. Assignments
are sorted by expert, so the rows for each rank of the EP group are contiguous; a first
all-to-all exchanges the per-expert counts (so every rank knows how many rows it will receive,
zero included), a second one the rows; the local experts run on their rows with the model's own
dispatch kernels; a third all-to-all brings the outputs back, where they are weighted and summed
per token.

The exchanges and the local experts form **one autograd node** (:class:`_ExpertExchange`): its
backward runs the reverse exchanges and the local experts' backward inside, and always returns a
weight gradient (zeros for a rank that received no rows). So on every rank the expert weights'
gradients arrive at the same point of the backward, after the same exchanges, whatever the
routing: the engine's reduce-scatter of an expert chunk over the expert data-parallel group
(``myriad.engine.groups``) then comes in the same order on every member, and a rank or an expert
without tokens still takes part in every exchange and never hangs.

Shape legend: T tokens, D model dim, K top-k, A = T*K assignments, E experts, L = E/k local
experts, k EP-group ranks, R rows received by this rank, F expert hidden.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from myriad.engine.comm import Comm
from myriad.engine.groups import ExpertGroups, expert_groups, resolve_size
from myriad.errors import UserError
from myriad.model.moe import MoEFeedForward, choose_strategy
from myriad.model.moe_dispatch import combine, dispatch, plan_dispatch, swiglu_experts

EXPERT_WEIGHTS = ("w_in_EDF2", "w_out_EFD")


def _exchange(comm: Comm, x: torch.Tensor, out_splits: list, in_splits: list) -> torch.Tensor:
    """Rows of ``x`` to ranks by ``in_splits``; returns the ``out_splits`` rows received."""
    out = x.new_empty(sum(out_splits), x.shape[1])
    comm.all_to_all(out, x.contiguous(), out_splits, in_splits)
    return out


class _ExpertExchange(torch.autograd.Function):
    """Rows out, local experts, rows back; backward: the same in reverse, in one node."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_AD: torch.Tensor,
        w_in_LDF2: torch.Tensor,
        w_out_LFD: torch.Tensor,
        ep: ExpertParallel,
        recv_NL: torch.Tensor,
        send: list[int],
        recv: list[int],
    ) -> torch.Tensor:
        rows_RD = _exchange(ep.comm, x_AD, recv, send)
        grad = any(ctx.needs_input_grad[:3])
        with torch.enable_grad() if grad else torch.no_grad():
            # Detached leaves: the inner graph gives the local gradients in backward. The weight
            # aliases share the parameters' storage, which the engine gathers again before it.
            inner = [t.detach().requires_grad_(grad) for t in (rows_RD, w_in_LDF2, w_out_LFD)]
            if rows_RD.shape[0] == 0:
                y_RD = rows_RD.new_zeros(0, rows_RD.shape[1])
            else:
                y_RD = ep.local_experts(inner[0], recv_NL, inner[1], inner[2])
        ctx.ep, ctx.splits = ep, (send, recv)
        ctx.inner, ctx.y_RD = inner, y_RD
        return _exchange(ep.comm, y_RD.detach(), send, recv)

    @staticmethod
    def backward(ctx: Any, d_back_AD: torch.Tensor):  # type: ignore[override]
        ep, (send, recv) = ctx.ep, ctx.splits
        rows_RD, w_in, w_out = ctx.inner
        d_y_RD = _exchange(ep.comm, d_back_AD, recv, send)
        if ctx.y_RD.requires_grad:
            d_rows, d_w_in, d_w_out = torch.autograd.grad(ctx.y_RD, ctx.inner, d_y_RD)
        else:  # no rows here: zero gradients, still returned so every rank reduces alike
            d_rows, d_w_in, d_w_out = (torch.zeros_like(t) for t in ctx.inner)
        ctx.inner = ctx.y_RD = None
        d_x_AD = _exchange(ep.comm, d_rows, send, recv)
        if ep.grad_scale != 1.0:
            d_w_in.mul_(ep.grad_scale)
            d_w_out.mul_(ep.grad_scale)
        return d_x_AD, d_w_in, d_w_out, None, None, None, None


class ExpertParallel:
    """Runs experts ``[rank*L, (rank+1)*L)`` here for the tokens of every rank of ``comm``.

    ``grad_scale`` multiplies the local experts' weight gradients (the engine passes 1/k: see
    :func:`split_experts`).
    """

    def __init__(self, comm: Comm, num_experts: int, grad_scale: float = 1.0) -> None:
        self.comm = comm
        self.num_experts = num_experts
        self.local = num_experts // comm.world
        self.grad_scale = grad_scale
        self.max_groups = 1023

    def exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """(k, L) rows each source rank will send to each of this rank's experts."""
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
        back_AD = _ExpertExchange.apply(x_AD, w_in_LDF2, w_out_LFD, self, recv_NL, send, recv)
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


def split_experts(
    model: nn.Module, comm: Comm, size: int
) -> tuple[dict[nn.Parameter, tuple[int, int]], ExpertGroups | None]:
    """Keep only this rank's experts of every MoE layer and route them through all-to-all.

    ``size`` is ``engine.expert_parallel_size`` (0: all ranks). Returns each kept expert
    parameter's (first row, rows in the full tensor) and the groups, or nothing to split when
    the EP size is 1 (every rank keeps every expert: plain ZeRO partitioning over the world).

    Gradient scaling: a local expert's gradient sums the losses of the k ranks of its EP group
    (the all-to-all backward); the reduce-scatter over the N/k ranks of its expert data-parallel
    group sums the groups and divides by N/k; ``grad_scale`` = 1/k makes it the mean over all N
    ranks, like every other gradient.
    """
    layers = moe_layers(model)
    k = expert_parallel_size(layers, comm.world, size)
    if k == 1:
        return {}, None
    groups = expert_groups(comm, k)
    return keep_local_experts(layers, groups.ep), groups


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def expert_parallel_size(layers: list[MoEFeedForward], world: int, size: int) -> int:
    """The EP group size k for ``engine.expert_parallel_size`` = ``size`` (checked; 1: none)."""
    sizes = {resolve_size(size, world, m.cfg.num_experts) for m in layers}
    k = sizes.pop() if sizes else 1
    if k > 1 and any(m.cfg.capacity_factor > 0 for m in layers):
        raise UserError("engine.expert_parallel needs dropless MoE: model.moe.capacity_factor = 0")
    return k


def keep_local_experts(
    layers: list[MoEFeedForward], ep: Comm
) -> dict[nn.Parameter, tuple[int, int]]:
    """Cut every layer's expert weights to EP rank ``ep.rank``'s E/k rows and send its tokens
    through all-to-all over ``ep``; returns each kept parameter's (first row, E)."""
    local: dict[nn.Parameter, tuple[int, int]] = {}
    for module in layers:
        E = module.cfg.num_experts
        per = E // ep.world
        first = ep.rank * per
        for attr in EXPERT_WEIGHTS:
            part = getattr(module, attr).detach()[first : first + per].clone()
            setattr(module, attr, nn.Parameter(part))
            local[getattr(module, attr)] = (first, E)
        module.expert_fn = ExpertParallel(ep, E, grad_scale=1.0 / ep.world)
    return local
