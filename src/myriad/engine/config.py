"""Typed configuration of the training engine (recipe section ``engine``); plain values only."""

from __future__ import annotations

from dataclasses import dataclass

from myriad.errors import UserError

ENGINE_KINDS = ("none", "myriad", "fsdp2")
DTYPE_NAMES = ("float32", "bfloat16")  # engine.param_dtype / engine.reduce_dtype
SWITCHES = ("auto", "on", "off")  # engine.overlap_step
PLACEMENTS = ("auto", "static", "dynamic")  # engine.placement


@dataclass(kw_only=True)
class EngineConfig:
    """How model states are partitioned, placed and exchanged across processes.

    ``kind`` picks the backend: ``none`` (plain single-process / replicated model), ``myriad``
    (this package's chunked ZeRO-3 engine with heterogeneous memory and expert parallelism) or
    ``fsdp2`` (PyTorch ``fully_shard``).
    """

    kind: str = "none"
    chunk_mb: float = 32.0  # fp32 chunk size; raised to the largest parameter when smaller
    device_budget_mb: float = 0.0  # device memory for the step (chunks + traced rest); 0 = no cap
    expert_parallel: bool = False  # split experts across ranks, tokens exchanged by all-to-all
    expert_parallel_size: int = 0  # ranks per expert-parallel group (consecutive); 0 = all ranks
    cpu_offload: bool = False  # fsdp2: CPUOffloadPolicy
    timeout_s: float = 300.0  # a collective waiting longer than this fails with a clear error
    backend: str = "auto"  # "auto" (nccl on CUDA, gloo on CPU), "gloo" or "nccl" (+ gloo for CPU)
    prefetch_mb: float = 256.0  # payload bytes loaded ahead of use after the warm-up; 0 = off
    gather_ahead: int = 1  # chunks whose all-gather starts while the one before computes; 0 = off
    param_dtype: str = "float32"  # gathered parameters and compute: "float32" or "bfloat16"
    reduce_dtype: str = "float32"  # gradient reduce-scatter and gradient shard: same choices
    # host-resident payloads' Adam in a background thread, during the next forward: "auto" (on
    # with CUDA, where the GPU would idle through it), "on" or "off"
    overlap_step: str = "auto"
    # payloads on the device after the warm-up: "static" (fixed, the rest served from the
    # host), "dynamic" (moved in and out as the traced order of use says), "auto" (static on
    # CUDA, where moving a payload costs far more PCIe time than serving it from the host)
    placement: str = "auto"

    def validate(self) -> None:
        """Reject inconsistent values with a message naming the key."""
        checks = [
            (self.kind in ENGINE_KINDS, f"engine.kind must be one of {ENGINE_KINDS}"),
            (self.chunk_mb > 0, "engine.chunk_mb must be > 0"),
            (self.device_budget_mb >= 0, "engine.device_budget_mb must be >= 0"),
            (self.expert_parallel_size >= 0, "engine.expert_parallel_size must be >= 0"),
            (
                self.expert_parallel or self.expert_parallel_size == 0,
                "engine.expert_parallel_size needs engine.expert_parallel = true",
            ),
            (self.timeout_s > 0, "engine.timeout_s must be > 0"),
            (self.backend in ("auto", "gloo", "nccl"), "engine.backend must be auto, gloo or nccl"),
            (self.prefetch_mb >= 0, "engine.prefetch_mb must be >= 0"),
            (self.gather_ahead >= 0, "engine.gather_ahead must be >= 0"),
            (self.param_dtype in DTYPE_NAMES, f"engine.param_dtype must be one of {DTYPE_NAMES}"),
            (self.reduce_dtype in DTYPE_NAMES, f"engine.reduce_dtype must be one of {DTYPE_NAMES}"),
            (self.overlap_step in SWITCHES, f"engine.overlap_step must be one of {SWITCHES}"),
            (self.placement in PLACEMENTS, f"engine.placement must be one of {PLACEMENTS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message}, got {self._value(message)!r}")

    def _value(self, message: str) -> object:
        key = message.split()[0].split(".", 1)[1]
        return getattr(self, key)
