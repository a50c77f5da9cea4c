"""Typed configuration of the MoE language model; plain values only."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class MoEConfig:
    """The mixture-of-experts feed-forward layers.

    Balancing terms are independent coefficients so a recipe can combine them: the Switch
    load-balancing loss (``aux_loss_coef``), the router z-loss (``z_loss_coef``) and the
    auxiliary-loss-free per-expert bias of DeepSeek-V3 (``bias_update_rate``; 0 turns it off).
    """

    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 512  # hidden width of one expert's SwiGLU
    every: int = 1  # MoE FFN in every k-th layer (layers k-1, 2k-1, ...); 0 means a dense model
    num_shared_experts: int = 0  # always-on experts, each of width d_expert
    norm_topk: bool = True  # renormalise the k selected probabilities to sum to 1
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    capacity_factor: float = 0.0  # 0: dropless; >0: each expert takes at most cf*T*K/E tokens


@dataclass(kw_only=True)
class ModelConfig:
    """A pre-norm Transformer LM: bidirectional masked-LM encoder or causal decoder."""

    objective: str = "mlm"  # "mlm" (bidirectional encoder) or "clm" (causal decoder)
    vocab_size: int = 8000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads; fewer gives grouped-query attention
    d_ff: int = 1024  # hidden width of the dense SwiGLU FFN layers
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    moe: MoEConfig = field(default_factory=MoEConfig)

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` (0-based) has an MoE FFN rather than a dense one."""
        every = self.moe.every
        return every > 0 and (index + 1) % every == 0

    def validate(self) -> None:
        """Reject inconsistent values with a message naming the key."""
        from myriad.errors import UserError

        checks = [
            (self.objective in ("mlm", "clm"), "model.objective must be 'mlm' or 'clm'"),
            (self.d_model % self.n_heads == 0, "model.d_model must be divisible by model.n_heads"),
            (
                self.n_heads % (self.n_kv_heads or self.n_heads) == 0,
                "model.n_heads must be divisible by model.n_kv_heads",
            ),
            ((self.d_model // self.n_heads) % 2 == 0, "model head dim must be even for rotary"),
            (
                1 <= self.moe.top_k <= self.moe.num_experts,
                "model.moe.top_k must be in [1, num_experts]",
            ),
            (self.moe.capacity_factor >= 0, "model.moe.capacity_factor must be >= 0"),
            (self.moe.every >= 0, "model.moe.every must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
