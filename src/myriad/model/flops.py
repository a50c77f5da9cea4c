"""Exact matmul FLOPs of one forward pass, from the config alone (no model is built).

Counted: every matrix multiply at 2 FLOPs per multiply-add. Not counted: embedding lookups, norms,
rotary, softmax, activations, the MoE combine and other elementwise work (O(S*D) per layer).

Per sequence of S tokens, with D model dim, H heads, G kv heads, Dh head dim, E experts,
K top-k, F hidden widths, V vocabulary, N labelled positions:

- attention projections: Q ``2*S*D*H*Dh``, K and V ``2*S*D*G*Dh`` each, O ``2*S*H*Dh*D``
- scores QK^T ``2*H*S*S*Dh`` and PV ``2*H*S*S*Dh``: the full S x S product, as the kernels
  compute it (a causal model counts it whole too)
- dense FFN ``3*2*S*D*F``; MoE layer ``(K + shared) * 3*2*S*D*F_expert`` (active experts only)
- router: hidden-state routing ``2*S*D*E`` per MoE layer; word-vector routing ``2*S*D_in*E``
  once for all layers (D_in = D or the routing dim); frozen routing 0 (a table lookup)
- LM head ``2*N*D*V`` at the labelled positions only (how ``MoETransformerLM`` computes it)

A reuse layer that reuses skips Q, K and QK^T: it keeps V, O and PV.
"""

from __future__ import annotations

from dataclasses import dataclass

from myriad.model.config import ModelConfig

REUSE_MODES = ("off", "inference", "training")


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one sequence by part; ``per_token`` divides by the sequence length."""

    seq_len: int
    attn_qk_proj: float  # Q and K projections
    attn_vo_proj: float  # V and output projections
    attn_scores: float  # QK^T
    attn_values: float  # PV
    ffn: float  # dense FFNs, active routed experts and shared experts
    router: float
    lm_head: float

    @property
    def attention(self) -> float:
        return self.attn_qk_proj + self.attn_vo_proj + self.attn_scores + self.attn_values

    @property
    def total(self) -> float:
        return self.attention + self.ffn + self.router + self.lm_head

    def per_token(self) -> dict[str, float]:
        """Every part and the totals, per token of the sequence."""
        parts = {
            "attn_qk_proj": self.attn_qk_proj,
            "attn_vo_proj": self.attn_vo_proj,
            "attn_scores": self.attn_scores,
            "attn_values": self.attn_values,
            "attention": self.attention,
            "ffn": self.ffn,
            "router": self.router,
            "lm_head": self.lm_head,
            "total": self.total,
        }
        return {k: v / self.seq_len for k, v in parts.items()}


def computing_share(cfg: ModelConfig, reuse: str) -> list[float]:
    """Per layer, the expected share of forwards in which it computes its own attention.

    ``reuse``: "off" (every layer computes), "inference" (the recipe's fixed schedule) or
    "training" (a reuse layer computes with probability ``attn_reuse.recompute_prob``).
    """
    if reuse not in REUSE_MODES:
        raise ValueError(f"reuse must be one of {REUSE_MODES}, got {reuse!r}")
    share = [1.0] * cfg.n_layers
    if reuse == "off":
        return share
    plan = cfg.attn_reuse.inference_plan(cfg.n_layers)
    for j, layer in enumerate(cfg.attn_reuse.reuse_layers(cfg.n_layers)):
        if reuse == "training":
            share[layer] = cfg.attn_reuse.recompute_prob
        else:
            share[layer] = 0.0 if plan[j] else 1.0
    return share


def forward_flops(
    cfg: ModelConfig,
    seq_len: int,
    *,
    labelled_positions: float | None = None,
    reuse: str = "inference",
    frozen_routing: bool = False,
) -> FlopCount:
    """FLOPs of one forward pass over one sequence of ``seq_len`` tokens.

    Args:
        labelled_positions: positions the LM head runs on; None means every position that can
            carry a target (S for masked-LM, S - 1 for causal LM).
        reuse: see :func:`computing_share`.
        frozen_routing: word-vector routing after ``freeze_routing`` (a lookup, no router matmul).
    """
    S, D, V = seq_len, cfg.d_model, cfg.vocab_size
    H, G = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    Dh = D // H
    moe = cfg.moe
    share = computing_share(cfg, reuse)
    qk = vo = scores = values = ffn = router = 0.0
    for i in range(cfg.n_layers):
        qk += share[i] * (2 * S * D * H * Dh + 2 * S * D * G * Dh)
        scores += share[i] * 2 * H * S * S * Dh
        vo += 2 * S * D * G * Dh + 2 * S * H * Dh * D
        values += 2 * H * S * S * Dh
        if cfg.is_moe_layer(i):
            ffn += (moe.top_k + moe.num_shared_experts) * 3 * 2 * S * D * moe.d_expert
            router += 0 if cfg.shared_routing else 2 * S * D * moe.num_experts
        else:
            ffn += 3 * 2 * S * D * cfg.d_ff
    if cfg.shared_routing and not frozen_routing:
        d_in = moe.routing_dim if moe.router_input == "routing_embedding" else D
        router += 2 * S * d_in * moe.num_experts
    if labelled_positions is None:
        labelled_positions = S - 1 if cfg.objective == "clm" else S
    lm_head = 2 * labelled_positions * D * V
    return FlopCount(S, qk, vo, scores, values, ffn, router, lm_head)


def attention_saving(
    cfg: ModelConfig, seq_len: int, labelled_positions: float | None = None
) -> dict[str, float]:
    """Attention and total FLOPs per token without reuse, at inference and in training.

    ``*_cut`` values are the fraction saved relative to no reuse (training: expected value).
    """
    kinds = {
        m: forward_flops(cfg, seq_len, labelled_positions=labelled_positions, reuse=m)
        for m in REUSE_MODES
    }
    base = kinds["off"]
    out: dict[str, float] = {
        "attention_per_token": base.per_token()["attention"],
        "total_per_token": base.per_token()["total"],
    }
    for mode in ("inference", "training"):
        count = kinds[mode]
        out[f"attention_per_token_{mode}"] = count.per_token()["attention"]
        out[f"attention_cut_{mode}"] = (base.attention - count.attention) / base.attention
        out[f"total_cut_{mode}"] = (base.total - count.total) / base.total
    return out
