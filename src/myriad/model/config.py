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
    # What the router scores experts from: "hidden" (each MoE layer's own hidden state), "word"
    # (the detached input embedding of the token id) or "routing_embedding" (a separate small
    # embedding). The last two depend on token ids only: one decision per batch, shared by every
    # MoE layer, which the trainer can freeze (train.freeze_routing_step).
    router_input: str = "hidden"
    routing_dim: int = 64  # width of the routing embedding (router_input = "routing_embedding")
    # Start from frequency-balanced expert bins measured on the training data (routing_embedding
    # only; the trainer passes the token counts to MoETransformerLM.init_balanced_routing).
    balanced_init: bool = False


ROUTER_INPUTS = ("hidden", "word", "routing_embedding")


@dataclass(kw_only=True)
class AttnReuseConfig:
    """Attention-weight reuse: reuse layers take the previous layer's attention probabilities.

    Reuse layers are every ``every``-th layer (layers every-1, 2*every-1, ..., never layer 0).
    In training each reuse layer recomputes its own attention with probability
    ``recompute_prob``; in evaluation it follows ``inference``: "reuse", "recompute", or one
    letter per reuse layer ("r" reuse, "c" compute), e.g. "rc" for two reuse layers.
    """

    every: int = 0  # 0: no reuse layers
    recompute_prob: float = 0.5
    inference: str = "reuse"

    def reuse_layers(self, n_layers: int) -> list[int]:
        """0-based indices of the reuse layers."""
        if self.every <= 0:
            return []
        return [i for i in range(1, n_layers) if (i + 1) % self.every == 0]

    def inference_plan(self, n_layers: int) -> list[bool]:
        """For each reuse layer, whether it reuses (True) or computes its own attention."""
        count = len(self.reuse_layers(n_layers))
        if self.inference in ("reuse", "recompute"):
            return [self.inference == "reuse"] * count
        return [letter == "r" for letter in self.inference]


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
    attn_reuse: AttnReuseConfig = field(default_factory=AttnReuseConfig)

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` (0-based) has an MoE FFN rather than a dense one."""
        every = self.moe.every
        return every > 0 and (index + 1) % every == 0

    @property
    def shared_routing(self) -> bool:
        """Whether one token-id router serves every MoE layer (word-vector routing)."""
        return self.moe.every > 0 and self.moe.router_input != "hidden"

    def validate(self) -> None:
        """Reject inconsistent values with a message naming the key."""
        from myriad.errors import UserError

        moe, reuse = self.moe, self.attn_reuse
        has_dense = any(not self.is_moe_layer(i) for i in range(self.n_layers))
        sizes = [  # first: the checks below divide by some of them
            ("model.vocab_size", self.vocab_size, 1),
            ("model.d_model", self.d_model, 1),
            ("model.n_layers", self.n_layers, 1),
            ("model.n_heads", self.n_heads, 1),
            ("model.n_kv_heads", self.n_kv_heads, 0),
            ("model.d_ff", self.d_ff if has_dense else 1, 1),  # dense FFN layers only
            ("model.max_seq_len", self.max_seq_len, 1),
            ("model.moe.d_expert", moe.d_expert if moe.every > 0 else 1, 1),
            ("model.moe.num_shared_experts", moe.num_shared_experts, 0),
        ]
        for key, value, least in sizes:
            if value < least:
                raise UserError(f"{key} must be >= {least}, got {value}")
        n_reuse = len(reuse.reuse_layers(self.n_layers))
        pattern_ok = reuse.inference in ("reuse", "recompute") or (
            len(reuse.inference) == n_reuse and set(reuse.inference) <= {"r", "c"}
        )
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
            (
                moe.router_input in ROUTER_INPUTS,
                f"model.moe.router_input must be one of {', '.join(ROUTER_INPUTS)}, "
                f"got {moe.router_input!r}",
            ),
            (moe.routing_dim >= 1, "model.moe.routing_dim must be >= 1"),
            (
                not moe.balanced_init or moe.router_input == "routing_embedding",
                "model.moe.balanced_init needs model.moe.router_input = 'routing_embedding'",
            ),
            (
                not moe.balanced_init or moe.routing_dim >= moe.num_experts,
                "model.moe.balanced_init needs model.moe.routing_dim >= model.moe.num_experts",
            ),
            (reuse.every >= 0, "model.attn_reuse.every must be >= 0"),
            (
                0.0 <= reuse.recompute_prob <= 1.0,
                "model.attn_reuse.recompute_prob must be in [0, 1]",
            ),
            (
                pattern_ok,
                "model.attn_reuse.inference must be 'reuse', 'recompute' or one letter r/c per "
                f"reuse layer ({n_reuse} here), got {reuse.inference!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
