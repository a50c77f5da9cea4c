"""Mixed precision inside the engine: which dtype each of a chunk's tensors is kept in.

The meaning is FSDP2's ``MixedPrecisionPolicy(param_dtype, reduce_dtype)``, with the engine's
memory target in mind (the issue's 14 bytes of host RAM per parameter under offload):

* the payload keeps the **fp32 master** shard and fp32 Adam moments (4 + 8 bytes per element);
* a chunk is all-gathered from its shard cast to ``param``: the gathered buffer and the model's
  parameter views are ``param``, so forward and backward run in it and autograd's gradients are
  ``param``;
* gradients are summed in a full buffer of dtype ``reduce``, reduce-scattered in it, and the
  owner's **gradient shard is kept in** ``reduce`` (2 bytes with bfloat16: 4 + 2 + 8 = 14);
* the optimizer updates the fp32 masters; a low-precision gradient shard is upcast one chunk at
  a time during the step (PyTorch's fused AdamW needs one dtype), so at most one shard's fp32
  gradient exists at once.

With both dtypes float32 nothing is cast and the engine is bit-identical to its fp32 form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MASTER = torch.float32
MOMENT_BYTES = 8  # two fp32 Adam moments per element
STEP_BYTES = 4  # one fp32 step counter per payload


@dataclass(frozen=True)
class Precision:
    """The two compute dtypes of a partitioned model (masters and moments are always fp32)."""

    param: torch.dtype = torch.float32  # gathered chunks, parameter views, autograd gradients
    reduce: torch.dtype = torch.float32  # full gradient buffers, reduce-scatter, gradient shard

    @classmethod
    def named(cls, param_dtype: str, reduce_dtype: str) -> Precision:
        """From the recipe's names (``engine.param_dtype``, ``engine.reduce_dtype``)."""
        return cls(DTYPES[param_dtype], DTYPES[reduce_dtype])

    @property
    def param_size(self) -> int:
        return _size(self.param)

    @property
    def reduce_size(self) -> int:
        return _size(self.reduce)

    @property
    def grad_is_master(self) -> bool:
        """The gradient shard has the master's dtype, so it can be its ``.grad`` as is."""
        return self.reduce == MASTER

    def payload_bytes(self, shard_numel: int) -> int:
        """Bytes a chunk's payload keeps for good: master, gradient shard, moments, step."""
        return (_size(MASTER) + self.reduce_size + MOMENT_BYTES) * shard_numel + STEP_BYTES


def fsdp2_dtypes(
    param_dtype: str, reduce_dtype: str
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """The same two keys as FSDP2's ``MixedPrecisionPolicy`` arguments for an fp32 model:
    None where no cast is wanted (fp32 parameters; a reduce dtype equal to the parameters'), so
    the default stays FSDP2's plain fp32 path."""
    param = DTYPES[param_dtype]
    reduce = DTYPES[reduce_dtype]
    return (None if param == MASTER else param), (None if reduce == param else reduce)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
