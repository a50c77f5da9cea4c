"""AdamW over the owned shards only, each step running where its payload lives.

The shard tensors are the optimizer's parameters; their ``.data`` (and their gradients' and
moments') move between device and host as the memory manager places them, while the tensor
objects stay the same, so ``torch.optim`` keys its state on them unchanged. The update is
PyTorch's fused AdamW kernel, which groups tensors by device: device-resident shards are stepped
on the device, host-resident ones by the vectorised CPU kernel, in one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class ShardAdamW(torch.optim.AdamW):
    """AdamW whose parameters are shard tensors with persistent gradient buffers.

    ``zero_grad`` zeroes those buffers in place (the reduce-scatter adds into them) rather than
    dropping them. ``before_step`` lets the memory manager place payloads first.
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
    ) -> None:
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        super().__init__(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
        self._before, self._after = before_step, after_step
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
        out = super().step(closure)
        self._after()
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.zero_()


def shard_param(values: torch.Tensor) -> nn.Parameter:
    """An optimizer parameter for a shard, with a zeroed gradient buffer attached."""
    p = nn.Parameter(values, requires_grad=True)
    p.grad = torch.zeros_like(values)
    return p
