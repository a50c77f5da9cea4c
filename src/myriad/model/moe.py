"""The MoE feed-forward layer: route, move tokens to their experts' rows, run all experts at once.

How the rows are laid out and multiplied is a *dispatch strategy* (see ``moe_dispatch``), chosen
per call from the shape by :func:`choose_strategy` unless ``MoEFeedForward.dispatch_strategy``
forces one; every strategy computes the same function exactly.

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden, A = T*K assignments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from myriad.model import cpu_kernels, gemm_batch
from myriad.model.config import MoEConfig
from myriad.model.layers import SwiGLU
from myriad.model.moe_dispatch import (
    STRATEGIES,
    GradBuffers,
    combine,
    dispatch,
    grouped_mm_fn,
    plan_dispatch,
    swiglu_experts,
)
from myriad.model.router import Routing, TopKRouter

# Mean assignments per expert from which grouped_mm is preferred to the padded bmm. On the CPU
# (docs/moe.md, with the CPU gradient-buffer reuse) the padded bmm was 0-5 % behind grouped_mm at
# 512 rows per expert on an idle machine, 8 % ahead at 64 rows, 50 % ahead at 8, and 1.7-13x ahead
# when other processes loaded the cores (grouped_mm runs one small parallel mm per expert):
# padded is the robust CPU default.
# On CUDA grouped_mm has no host sync and no padding; on an H200 it beat the padded bmm by 16 % at
# 64 experts and 44 % at 512 (tied at 8), so CUDA takes it whenever one call can hold all experts.
# Above that, chunked grouped_mm was 10 % behind padded at 1,536 experts (docs/benchmarks.md).
GROUPED_MIN_ROWS_PER_EXPERT = {"cpu": 4096, "cuda": 0}
# Where Myriad's own CPU kernel cannot be built: below this mean load per expert the CPU in fp32
# takes MKL's grouped batch GEMM: 1.08-1.26x the padded bmm at 64 rows per expert, 1.00-1.20x at
# 8 rows; at 512 rows it was 0.92-0.98x on a quiet machine, so padded keeps the few-expert
# shapes (docs/benchmarks.md, 2026-12-03).
GEMM_BATCH_MAX_ROWS_PER_EXPERT = 256
# CUDA's grouped matmul checks group_count < 1024, so at most 1,023 experts per call.
MAX_GROUPS = 1023


@dataclass
class MoEOutput:
    """The layer's output plus what the trainer needs; travels by return value, never globals."""

    y: torch.Tensor
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor  # routed assignments per expert, before any drop
    dropped_fraction: torch.Tensor  # share of assignments dropped by the capacity limit
    expert_ids_TK: torch.Tensor | None = None  # the routing decision (routing statistics)


def choose_strategy(
    num_assignments: int, num_experts: int, device: torch.device, dtype: torch.dtype
) -> str:
    """Pick the dispatch strategy for a shape: grouped when experts are busy, else padded.

    On the CPU in fp32, Myriad's own grouped GEMM (``cpu_kernel``) wherever it builds: no
    padding, one call for all experts, faster than MKL at every load measured (docs/moe.md).
    Else, with many small experts, MKL's grouped batch GEMM (``gemm_batch``) wherever PyTorch
    ships it. grouped_mm on CUDA
    takes only bf16 and at most ``MAX_GROUPS`` experts per call; builds without a grouped
    matmul use the padded bmm (exact, and fast at every size we measured).
    """
    on_cuda = device.type == "cuda"
    if not on_cuda and dtype == torch.float32 and cpu_kernels.available():
        return "cpu_kernel"
    few_rows = num_assignments < GEMM_BATCH_MAX_ROWS_PER_EXPERT * num_experts
    if not on_cuda and dtype == torch.float32 and few_rows and gemm_batch.available():
        return "gemm_batch"
    if grouped_mm_fn() is None:
        return "padded"
    if on_cuda and dtype != torch.bfloat16:
        return "padded"
    threshold = GROUPED_MIN_ROWS_PER_EXPERT["cuda" if on_cuda else "cpu"]
    if num_assignments < threshold * num_experts:
        return "padded"
    if num_experts > MAX_GROUPS:
        return "padded" if on_cuda else "grouped"  # the CPU kernel has no group limit
    return "grouped"


class MoEFeedForward(nn.Module):
    """Dropless (or capacity-limited) top-k mixture of SwiGLU experts, plus optional shared experts.

    Attributes:
        dispatch_strategy: "auto" (by shape) or one of ``moe_dispatch.STRATEGIES``; settable
            after construction (tests and benchmarks pin each strategy this way).
        max_groups: experts per grouped_mm call in the "chunked" strategy.
    """

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, D, F_ = cfg.num_experts, d_model, cfg.d_expert
        # Word-vector routing decides once per batch in the model and passes the decision in.
        self.router = TopKRouter(d_model, cfg) if cfg.router_input == "hidden" else None
        # Gate and up projections side by side: one batched matmul computes both.
        self.w_in_EDF2 = nn.Parameter(torch.empty(E, D, 2 * F_))
        self.w_out_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.shared = (
            SwiGLU(d_model, cfg.num_shared_experts * F_) if cfg.num_shared_experts > 0 else None
        )
        self.dispatch_strategy = "auto"
        self.max_groups = MAX_GROUPS
        # CPU only: reuse expert weight-gradient memory across steps (moe_dispatch.GradBuffers);
        # saves the page faults of ~100 MB of fresh gradients per step at 256 experts.
        self.reuse_cpu_grad_buffers = True
        self._grad_bufs = GradBuffers()
        # Seam for engines (e.g. expert parallelism), set from outside: when not None it computes
        # y_TD from (x_TD, expert_ids_TK, weights_TK, w_in_EDF2, w_out_EFD) instead of the local
        # dispatch below (dropless only).
        self.expert_fn: Callable[..., torch.Tensor] | None = None

    def capacity(self, num_tokens: int) -> int:
        """Most assignments one expert keeps (0: dropless)."""
        cfg = self.cfg
        if cfg.capacity_factor <= 0:
            return 0
        return int(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts + 0.999999)

    def strategy_for(self, x_TD: torch.Tensor) -> str:
        if self.dispatch_strategy != "auto":
            if self.dispatch_strategy not in STRATEGIES:
                raise ValueError(f"dispatch_strategy must be 'auto' or one of {STRATEGIES}")
            return self.dispatch_strategy
        num_assignments = x_TD.shape[0] * self.cfg.top_k
        return choose_strategy(num_assignments, self.cfg.num_experts, x_TD.device, x_TD.dtype)

    def forward(self, x_TD: torch.Tensor, routing: Routing | None = None) -> MoEOutput:
        # The hand-written autograd below runs outside autocast, on one explicit compute dtype:
        # autocast would leave out= matmuls in fp32 and hand backward mixed dtypes. The router
        # stays in fp32 either way.
        compute_dtype = _autocast_dtype(x_TD)
        with torch.autocast(x_TD.device.type, enabled=False):
            if routing is None:
                if self.router is None:
                    raise ValueError("this MoE layer routes by token id: pass routing=")
                routing = self.router(x_TD)
            x_TD_c = x_TD.to(compute_dtype)
            T, K = x_TD.shape[0], self.cfg.top_k
            capacity = self.capacity(T)
            w_in = self.w_in_EDF2.to(compute_dtype)
            w_out = self.w_out_EFD.to(compute_dtype)
            if self.expert_fn is not None:
                ids_TK, weights_TK = routing.expert_ids_TK, routing.weights_TK
                y_TD = self.expert_fn(x_TD_c, ids_TK, weights_TK, w_in, w_out)
            else:
                plan = plan_dispatch(
                    routing.expert_ids_TK,
                    routing.counts_E,
                    self.strategy_for(x_TD_c),
                    capacity,
                    self.max_groups,
                )
                bufs = None
                if self.reuse_cpu_grad_buffers and x_TD.device.type == "cpu":
                    bufs = self._grad_bufs
                y_rows = swiglu_experts(dispatch(x_TD_c, plan), w_in, w_out, plan.mm, bufs)
                y_TD = combine(y_rows, routing.weights_TK, plan)
        dropped = x_TD.new_zeros((), dtype=torch.float32)
        if capacity > 0:
            kept = routing.counts_E.clamp(max=capacity).sum().float()
            dropped = 1.0 - kept / max(T * K, 1)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return MoEOutput(
            y_TD,
            routing.load_balance_loss,
            routing.z_loss,
            routing.counts_E,
            dropped,
            routing.expert_ids_TK,
        )


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute matmuls in here, or the input's own dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype
