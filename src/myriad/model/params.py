"""Parameter counts, total and active per token, computed from the config alone.

Computing from the config (not by instantiating) lets ``myriad info`` report a 10^12-parameter
recipe on a laptop; a test checks the formula against ``numel`` of a real model.
"""

from __future__ import annotations

from dataclasses import dataclass

from myriad.model.config import ModelConfig


@dataclass
class ParamCounts:
    total: int
    active: int  # parameters touched per token: shared weights plus top_k experts per MoE layer
    embedding: int
    experts: int  # all routed-expert weights


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    D, V = cfg.d_model, cfg.vocab_size
    head_dim = D // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    attn = D * cfg.n_heads * head_dim * 2 + D * kv * head_dim * 2
    norms = 2 * D
    dense_ffn = 3 * D * cfg.d_ff
    moe = cfg.moe
    expert = 3 * D * moe.d_expert
    router = 0 if cfg.shared_routing else moe.num_experts * D  # word routing: one, below
    shared = 3 * D * moe.d_expert * moe.num_shared_experts
    total = active = experts = 0
    for i in range(cfg.n_layers):
        total += attn + norms
        active += attn + norms
        if cfg.is_moe_layer(i):
            total += router + shared + moe.num_experts * expert
            active += router + shared + moe.top_k * expert
            experts += moe.num_experts * expert
        else:
            total += dense_ffn
            active += dense_ffn
    if cfg.shared_routing:
        routing_dim = moe.routing_dim if moe.router_input == "routing_embedding" else D
        shared_router = moe.num_experts * routing_dim
        if moe.router_input == "routing_embedding":
            shared_router += V * routing_dim
        total += shared_router
        active += shared_router
    embedding = V * D * (1 if cfg.tie_embeddings else 2)
    total += embedding + D
    active += embedding + D
    return ParamCounts(total=total, active=active, embedding=embedding, experts=experts)
