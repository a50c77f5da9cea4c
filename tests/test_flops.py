"""FLOP counts against a hand count and against PyTorch's own FLOP counter on a real forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from myriad.config import load_recipe
from myriad.model import IGNORE_INDEX, ModelConfig, MoEConfig, MoETransformerLM
from myriad.model.config import AttnReuseConfig
from myriad.model.flops import attention_saving, forward_flops


def hand_cfg(**kw) -> ModelConfig:
    """D 8, H 2, G 1 (Dh 4), dense FFN 12, MoE in layer 1: 4 experts top-2 + 1 shared, width 6."""
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=6, every=2, num_shared_experts=1)
    base: dict = dict(
        vocab_size=10, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=12, max_seq_len=5
    )
    base.update(kw)
    base.setdefault("moe", moe)
    return ModelConfig(**base)


# Hand count for one sequence of S = 5 with 2 labelled positions (2 FLOPs per multiply-add):
#   Q 2*5*8*8 = 640, K 2*5*8*4 = 320, V 320, O 640, QK^T 2*2*5*5*4 = 400, PV 400 (per layer)
#   dense SwiGLU (layer 0) 3*2*5*8*12 = 2880; MoE (layer 1) (2 + 1)*3*2*5*8*6 = 4320
#   hidden router (layer 1) 2*5*8*4 = 320; LM head 2*2*8*10 = 320
ATTN_LAYER = 640 + 320 + 320 + 640 + 400 + 400  # 2720
REUSE_SAVES = 640 + 320 + 400  # a reusing layer skips Q, K and QK^T: 1360


def test_hand_count_without_reuse():
    count = forward_flops(hand_cfg(), 5, labelled_positions=2)
    assert count.attn_qk_proj == 2 * (640 + 320)
    assert count.attn_vo_proj == 2 * (320 + 640)
    assert count.attn_scores == count.attn_values == 2 * 400
    assert count.attention == 2 * ATTN_LAYER == 5440
    assert count.ffn == 2880 + 4320
    assert count.router == 320
    assert count.lm_head == 320
    assert count.total == 5440 + 7200 + 320 + 320 == 13280
    assert count.per_token()["total"] == 13280 / 5


def test_hand_count_with_reuse():
    cfg = hand_cfg(attn_reuse=AttnReuseConfig(every=2, recompute_prob=0.25, inference="reuse"))
    assert forward_flops(cfg, 5, labelled_positions=2, reuse="off").attention == 5440
    assert forward_flops(cfg, 5, labelled_positions=2).attention == 5440 - REUSE_SAVES == 4080
    training = forward_flops(cfg, 5, labelled_positions=2, reuse="training")
    assert training.attention == 5440 - 0.75 * REUSE_SAVES == 4420  # recomputes 1 time in 4
    saving = attention_saving(cfg, 5, labelled_positions=2)
    assert saving["attention_cut_inference"] == REUSE_SAVES / 5440
    assert saving["total_cut_inference"] == REUSE_SAVES / 13280
    recompute = dataclasses.replace(cfg, attn_reuse=AttnReuseConfig(every=2, inference="c"))
    assert forward_flops(recompute, 5, labelled_positions=2).attention == 5440


@pytest.mark.parametrize(
    ("router_input", "frozen", "router_flops"),
    [
        ("hidden", False, 2 * 320),  # one router per MoE layer (both layers MoE here)
        ("word", False, 320),  # one router for the batch: 2*5*8*4
        ("routing_embedding", False, 2 * 5 * 3 * 4),  # routing dim 3
        ("word", True, 0),  # frozen: a table lookup
    ],
)
def test_router_flops_by_router_type(router_input, frozen, router_flops):
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=6, every=1, router_input=router_input)
    cfg = hand_cfg(moe=dataclasses.replace(moe, routing_dim=3))
    count = forward_flops(cfg, 5, labelled_positions=2, frozen_routing=frozen)
    assert count.router == router_flops
    assert count.ffn == 2 * 2 * 3 * 2 * 5 * 8 * 6


@pytest.mark.parametrize("inference", ["recompute", "reuse"])
def test_counts_match_torch_flop_counter_on_a_real_forward(inference):
    """Dense model on the explicit attention path: every matmul is an mm or bmm PyTorch counts."""
    reuse = AttnReuseConfig(every=2, inference=inference)
    cfg = hand_cfg(moe=MoEConfig(every=0), n_layers=4, attn_reuse=reuse, objective="clm")
    model = MoETransformerLM(cfg).eval()
    ids_BS = torch.randint(0, 10, (3, 5))
    labels_BS = ids_BS.clone()
    labels_BS[0, 2] = IGNORE_INDEX  # 3 * 4 shifted targets, one ignored: 11 labelled
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(ids_BS, labels_BS)
    ours = forward_flops(cfg, 5, labelled_positions=11 / 3)
    assert counter.get_total_flops() == pytest.approx(3 * ours.total, rel=1e-12)


def test_shipped_attnreuse_recipe_cuts_attention():
    cfg = load_recipe("tiny-zh-attnreuse").model
    saving = attention_saving(cfg, 128, labelled_positions=0.15 * 128)
    # d 256, S 128: per layer Q, K, V, O 131,072 FLOPs per token each, QK^T and PV 65,536 each;
    # a reusing layer skips Q, K and QK^T = 327,680 of 655,360: half its attention.
    assert saving["attention_per_token"] == 4 * 655_360
    assert saving["attention_cut_inference"] == 0.25  # 2 of 4 layers save half
    assert saving["attention_cut_training"] == 0.75 * 0.25  # they recompute 1 time in 4
