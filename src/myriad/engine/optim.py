"""AdamW over the owned shards only, each step running where its payload lives.

The shard tensors are the optimizer's parameters; their ``.data`` (and their gradients' and
moments') move between device and host as the memory manager places them, while the tensor
objects stay the same, so ``torch.optim`` keys its state on them unchanged. The update is
PyTorch's fused AdamW kernel, which groups tensors by device: device-resident shards are stepped
on the device, host-resident ones by the vectorised CPU kernel, in one call.

With a low-precision gradient shard (``engine.reduce_dtype = "bfloat16"``) the shard is not the
master's ``.grad`` (the kernel needs one dtype): the step upcasts one shard's gradient at a time
and runs the same kernel on that shard, so the fp32 copy of the gradients never exists whole. On
the host the upcast goes into one reused buffer per thread: a fresh fp32 tensor per shard is
fresh pages from the system each time, and faulting them in made the CPU step 6.4x slower with
16 M-element shards on 2 cores (``benchmarks/engine.py``, its AdamW line).

With ``engine.overlap_step`` the host-resident shards are updated later, by a background thread
(``overlap.py``), with the same kernel, one shard at a time, so the result is the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim.adamw import adamw

from myriad.engine.overlap import UpdateWorker

HYPER = ("lr", "betas", "weight_decay", "eps", "maximize", "foreach", "capturable", "fused")


class ShardAdamW(torch.optim.AdamW):
    """AdamW whose parameters are shard tensors with persistent gradient buffers.

    ``zero_grad`` zeroes those buffers in place (the reduce-scatter writes into them) rather than
    dropping them, or hands each shard to ``reset_grad``, which then does it. ``before_step``
    lets the memory manager place payloads first. ``low_grads`` maps a shard to its
    low-precision gradient shard when it has one instead of a ``.grad``. ``new_moments`` makes
    a shard's two zeroed Adam moments (default: beside the shard); the engine puts a host
    shard's straight into its home, so no second copy of them ever exists.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        before_step: Callable[[], None],
        after_step: Callable[[], None],
        low_grads: dict[torch.Tensor, torch.Tensor] | None = None,
        later: Callable[[], dict[torch.Tensor, int]] | None = None,
        worker: UpdateWorker | None = None,
        reset_grad: Callable[[torch.Tensor], None] | None = None,
        new_moments: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> None:
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        super().__init__(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
        self._before, self._after = before_step, after_step
        self.low_grads = low_grads or {}
        self._update = self._step_upcast if self.low_grads else super().step
        self._later = later  # shard -> chunk id of the updates to overlap (``overlap.py``)
        self._worker = worker
        self._reset_grad = reset_grad or self._zero
        self._in_flight: set[torch.Tensor] = set()  # their gradients are zeroed by the worker
        self._host_upcast = threading.local()  # .buffer: fp32 gradients, reused (see above)
        new_moments = new_moments or (lambda p: [torch.zeros_like(p), torch.zeros_like(p)])
        for group in self.param_groups:
            for p in group["params"]:
                exp_avg, exp_avg_sq = new_moments(p)
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": exp_avg,
                    "exp_avg_sq": exp_avg_sq,
                }

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self._before()
        later = self._later() if self._later is not None else {}
        self._in_flight = set(later)
        out = None
        if later:
            self._step_overlapped(later)
        else:
            out = self._update(closure)
        self._after()
        return out

    def _step_overlapped(self, later: dict[torch.Tensor, int]) -> None:
        """Step the shards not in ``later`` now; queue the others, in ``later``'s order, with
        this step's hyper-parameters (the schedule moves the group's lr before they run)."""
        assert self._worker is not None
        queued: list[tuple[torch.Tensor, dict[str, Any]]] = []
        for group in self.param_groups:
            hyper = {k: group[k] for k in HYPER}
            now = [p for p in group["params"] if p not in later]
            if now:
                self._adamw(now, hyper)
            queued += [(p, hyper) for p in group["params"] if p in later]
        position = {p: i for i, p in enumerate(later)}
        queued.sort(key=lambda item: position[item[0]])
        for p, hyper in queued:
            self._worker.submit(later[p], partial(self._update_and_zero, p, hyper))

    def _adamw(self, params: list[torch.Tensor], hyper: dict[str, Any]) -> None:
        """AdamW on ``params`` (low-precision gradients upcast one shard at a time)."""
        if any(p in self.low_grads for p in params):
            for p in params:
                self._adamw_on([p], [self._upcast(p)], hyper)
        else:
            self._adamw_on(params, [p.grad for p in params], hyper)

    def _upcast(self, p: torch.Tensor) -> torch.Tensor:
        """``p``'s low-precision gradient in ``p``'s dtype (on the host: in this thread's buffer,
        sized once for the largest shard)."""
        low = self.low_grads[p]
        if p.device.type != "cpu":
            return low.to(p.dtype)
        buffer = getattr(self._host_upcast, "buffer", None)
        if buffer is None:
            largest = max(g.numel() for g in self.low_grads.values())
            buffer = self._host_upcast.buffer = torch.empty(largest, dtype=p.dtype)
        return buffer[: low.numel()].view_as(low).copy_(low)

    def _adamw_on(self, params: list, grads: list, hyper: dict[str, Any]) -> None:
        states = [self.state[p] for p in params]
        adamw(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=hyper["foreach"],
            capturable=hyper["capturable"],
            differentiable=False,
            fused=hyper["fused"],
            amsgrad=False,
            beta1=hyper["betas"][0],
            beta2=hyper["betas"][1],
            lr=hyper["lr"],
            weight_decay=hyper["weight_decay"],
            eps=hyper["eps"],
            maximize=hyper["maximize"],
        )

    def _update_and_zero(self, p: torch.Tensor, hyper: dict[str, Any]) -> None:
        self._adamw([p], hyper)
        self._reset_grad(p)

    def _step_upcast(self, closure: Any = None) -> None:
        """One shard at a time: its gradient upcast to the master's dtype, then AdamW on it."""
        assert closure is None, "ShardAdamW with low-precision gradients takes no closure"
        for group in self.param_groups:
            self._adamw(group["params"], {k: group[k] for k in HYPER})

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self._in_flight:
                    self._reset_grad(p)

    def _zero(self, p: torch.Tensor) -> None:
        grad = self.low_grads.get(p, p.grad)
        if grad is not None:
            grad.zero_()


def shard_param(values: torch.Tensor, grad_dtype: torch.dtype | None = None) -> nn.Parameter:
    """An optimizer parameter for a shard, with a zeroed gradient buffer attached when the
    gradient shard has the master's dtype (otherwise the engine keeps it beside: ``low_grads``)."""
    p = nn.Parameter(values, requires_grad=True)
    if grad_dtype is None or grad_dtype == values.dtype:
        p.grad = torch.zeros_like(values)
    return p
