"""Typed configuration of the training loop; plain values only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class TrainConfig:
    """Optimiser, schedule, batch geometry, evaluation and checkpoint cadence."""

    seed: int = 0
    steps: int = 300  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    # Recompute each block's forward in the backward instead of keeping its activations: only
    # the blocks' inputs stay saved, for one more forward's compute (``MoETransformerLM``).
    activation_checkpointing: bool = False
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 50  # held-out loss every N steps (and at the end)
    eval_batches: int = 8  # held-out batches per evaluation; 0 uses every held-out sequence
    checkpoint_every: int = 100  # and always at the end
    keep_checkpoints: int = 3  # newest step-* directories kept; 0 keeps every checkpoint
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32"
    # Word-vector routing (model.moe.router_input "word"/"routing_embedding"): after this step
    # every token id keeps its experts for good (StableMoE's frozen stage); 0 never freezes.
    freeze_routing_step: int = 0
    # Hot-start (train/hotstart.py): a checkpoint to start from; load, upcycle or grow by shapes.
    init_from: str = ""  # a run, checkpoints or step directory; empty starts from scratch
    upcycle: str = "copy"  # dense -> MoE: "copy" (every expert = the FFN) or "split" (its units)
    upcycle_noise: float = 0.0  # Gaussian noise on upcycled experts, times each tensor's std
