"""AdamW over the owned shards only, each step running where its payload lives.

The shard tensors are the optimizer's parameters; their ``.data`` (and their gradients' and
moments') move between device and host as the memory manager places them, while the tensor
objects stay the same, so ``torch.optim`` keys its state on them unchanged. The update is
PyTorch's fused AdamW kernel, which groups tensors by device: device-resident shards are stepped
on the device, host-resident ones by the vectorised CPU kernel, in one call.

With a low-precision gradient shard (``engine.reduce_dtype = "bfloat16"``) the shard is not the
master's ``.grad`` (the kernel needs one dtype): the step upcasts one shard's gradient at a time
and runs the same kernel on that shard, so the fp32 copy of the gradients never exists whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.adamw import adamw


class ShardAdamW(torch.optim.AdamW):
    """AdamW whose parameters are shard tensors with persistent gradient buffers.

    ``zero_grad`` zeroes those buffers in place (the reduce-scatter adds into them) rather than
    dropping them. ``before_step`` lets the memory manager place payloads first. ``low_grads``
    maps a shard to its low-precision gradient shard when it has one instead of a ``.grad``.
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
    ) -> None:
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        super().__init__(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
        self._before, self._after = before_step, after_step
        self.low_grads = low_grads or {}
        self._update = self._step_upcast if self.low_grads else super().step
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self._before()
        out = self._update(closure)
        self._after()
        return out

    def _step_upcast(self, closure: Any = None) -> None:
        """One shard at a time: its gradient upcast to the master's dtype, then AdamW on it."""
        assert closure is None, "ShardAdamW with low-precision gradients takes no closure"
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                grad_S = self.low_grads[p].to(p.dtype)
                adamw(
                    [p],
                    [grad_S],
                    [state["exp_avg"]],
                    [state["exp_avg_sq"]],
                    [],
                    [state["step"]],
                    foreach=group["foreach"],
                    capturable=group["capturable"],
                    differentiable=group["differentiable"],
                    fused=group["fused"],
                    amsgrad=False,
                    beta1=group["betas"][0],
                    beta2=group["betas"][1],
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                )
                del grad_S

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
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
