"""Attention-weight reuse: the explicit path equals SDPA, reuse layers apply the previous layer's
probabilities to their own values, recomputation happens at rate p, inference follows its schedule.

Shape legend: B batch, S sequence (queries), T sequence (keys), D model dim, H heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from myriad.errors import UserError
from myriad.model import ModelConfig, MoEConfig, MoETransformerLM
from myriad.model.config import AttnReuseConfig
from myriad.model.layers import Attention, apply_rotary, rotary_tables

pytestmark = pytest.mark.usefixtures("one_thread")


def small(every: int = 2, p: float = 0.5, inference: str = "reuse", **kw) -> ModelConfig:
    base: dict = dict(
        vocab_size=40,
        d_model=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        max_seq_len=12,
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=16, every=2),
        attn_reuse=AttnReuseConfig(every=every, recompute_prob=p, inference=inference),
    )
    base.update(kw)
    return ModelConfig(**base)


def naive_probs(attn: Attention, x_BSD, cos, sin, mask_BS, causal: bool) -> torch.Tensor:
    """softmax(QK^T / sqrt(Dh)) head by head, kv heads shared by groups of query heads."""
    B, S, _ = x_BSD.shape
    H, G, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = apply_rotary((x_BSD @ attn.wq.weight.T).view(B, S, H, Dh).transpose(1, 2), cos, sin)
    k = apply_rotary((x_BSD @ attn.wk.weight.T).view(B, S, G, Dh).transpose(1, 2), cos, sin)
    probs = torch.zeros(B, H, S, S)
    for h in range(H):
        scores_BST = q[:, h] @ k[:, h // (H // G)].transpose(-1, -2) / math.sqrt(Dh)
        allowed_BST = torch.ones(B, S, S, dtype=torch.bool)
        if mask_BS is not None:
            allowed_BST &= mask_BS[:, None, :]
        if causal:
            allowed_BST &= torch.ones(S, S, dtype=torch.bool).tril()
        probs[:, h] = scores_BST.masked_fill(~allowed_BST, float("-inf")).softmax(-1)
    return probs


def naive_apply(attn: Attention, x_BSD, probs_BHST) -> torch.Tensor:
    """Given probabilities applied to this layer's own values, then its output projection."""
    B, S, _ = x_BSD.shape
    H, G, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    v = (x_BSD @ attn.wv.weight.T).view(B, S, G, Dh).transpose(1, 2)
    out = torch.stack([probs_BHST[:, h] @ v[:, h // (H // G)] for h in range(H)], dim=1)
    return out.transpose(1, 2).reshape(B, S, H * Dh) @ attn.wo.weight.T


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_explicit_path_equals_sdpa_and_naive(causal, kv_heads):
    attn = Attention(32, 4, kv_heads, causal)
    cos, sin = rotary_tables(10, 8, 10000.0)
    x_BSD = torch.randn(2, 10, 32)
    mask_BS = torch.ones(2, 10, dtype=torch.bool)
    mask_BS[1, 6:] = False
    out, probs = attn.forward_probs(x_BSD, cos, sin, mask_BS)
    torch.testing.assert_close(out, attn(x_BSD, cos, sin, mask_BS), atol=1e-5, rtol=1e-5)
    ref = naive_probs(attn, x_BSD, cos, sin, mask_BS, causal)
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(probs[1, :, :, 6:] == 0)  # padded keys get exactly no weight
    reused = attn.forward_reuse(x_BSD, ref)
    torch.testing.assert_close(reused, naive_apply(attn, x_BSD, ref), atol=1e-5, rtol=1e-5)


def reference_encode(model: MoETransformerLM, ids_BS, mask_BS, reuse: list[bool]):
    """The model's encoder written out naively: reuse layer j takes the previous probabilities
    when ``reuse[j]``, else computes its own."""
    cfg = model.cfg
    cos, sin = model.rope_cos, model.rope_sin
    reuse_layers = cfg.attn_reuse.reuse_layers(cfg.n_layers)
    x_BSD = model.embed(ids_BS)
    probs = None
    for i, block in enumerate(model.blocks):
        a_BSD = block.attn_norm(x_BSD)
        if i in reuse_layers and reuse[reuse_layers.index(i)]:
            x_BSD = x_BSD + naive_apply(block.attn, a_BSD, probs)
        else:
            probs = naive_probs(block.attn, a_BSD, cos, sin, mask_BS, cfg.objective == "clm")
            x_BSD = x_BSD + naive_apply(block.attn, a_BSD, probs)
        h_BSD = block.ffn_norm(x_BSD)
        if block.is_moe:
            x_BSD = x_BSD + block.ffn(h_BSD.reshape(-1, h_BSD.shape[-1])).y.view_as(x_BSD)
        else:
            x_BSD = x_BSD + block.ffn(h_BSD)
    return model.norm(x_BSD)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
@pytest.mark.parametrize("schedule", ["rr", "rc", "cr", "cc"])
def test_inference_follows_schedule_and_matches_reference(objective, schedule):
    model = MoETransformerLM(small(inference=schedule, objective=objective)).eval()
    assert [b.attn_mode for b in model.blocks] == ["probs", "reuse", "probs", "reuse"]
    ids_BS = torch.randint(0, 40, (2, 12))
    mask_BS = torch.ones(2, 12, dtype=torch.bool)
    mask_BS[0, 9:] = False
    with torch.no_grad():
        for _ in range(3):  # a fixed schedule: the same decisions every call
            h_BSD, enc = model.encode(ids_BS, mask_BS)
            assert enc.attn_recomputed == [letter == "c" for letter in schedule]
        ref = reference_encode(model, ids_BS, mask_BS, [letter == "r" for letter in schedule])
    torch.testing.assert_close(h_BSD, ref, atol=1e-4, rtol=1e-4)


def test_full_recompute_schedule_equals_the_model_without_reuse():
    reuse = MoETransformerLM(small(inference="recompute")).eval()
    plain = MoETransformerLM(small(every=0)).eval()
    plain.load_state_dict(reuse.state_dict())  # reuse adds no parameters
    ids_BS = torch.randint(0, 40, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            reuse.encode(ids_BS)[0], plain.encode(ids_BS)[0], atol=1e-5, rtol=1e-5
        )
        always = dataclasses.replace(reuse.cfg, attn_reuse=AttnReuseConfig(every=2))
        reusing = MoETransformerLM(always).eval()
        reusing.load_state_dict(reuse.state_dict())
        assert (reusing.encode(ids_BS)[0] - plain.encode(ids_BS)[0]).abs().max() > 1e-3


def test_padding_content_does_not_leak_through_reused_probabilities():
    model = MoETransformerLM(small(moe=MoEConfig(every=0))).eval()
    ids_BS = torch.randint(0, 40, (2, 12))
    mask_BS = torch.ones(2, 12, dtype=torch.bool)
    mask_BS[:, 8:] = False
    other_BS = ids_BS.clone()
    other_BS[:, 8:] = (ids_BS[:, 8:] + 7) % 40
    with torch.no_grad():
        a = model.encode(ids_BS, mask_BS)[0][:, :8]
        b = model.encode(other_BS, mask_BS)[0][:, :8]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_training_recomputes_at_rate_p(p):
    dense = MoEConfig(every=0)
    cfg = small(every=1, p=p, d_model=8, n_layers=11, n_heads=2, n_kv_heads=0, moe=dense)
    model = MoETransformerLM(cfg)  # 10 reuse layers, each an independent draw per forward
    ids_BS = torch.randint(0, 40, (1, 2))
    n = 0
    recomputed = 0
    with torch.no_grad():
        for _ in range(200):
            decisions = model.encode(ids_BS)[1].attn_recomputed
            n += len(decisions)
            recomputed += sum(decisions)
    assert n == 2000
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(recomputed - n * p) <= 4 * sigma  # exact for p = 0 and 1 (sigma = 0)


def test_recompute_draws_are_seeded():
    model = MoETransformerLM(small(p=0.5))
    ids_BS = torch.randint(0, 40, (1, 6))
    torch.manual_seed(3)
    first = [model(ids_BS, ids_BS).attn_recomputed for _ in range(20)]
    torch.manual_seed(3)
    assert [model(ids_BS, ids_BS).attn_recomputed for _ in range(20)] == first


def test_default_config_keeps_the_sdpa_path_bit_for_bit():
    """No reuse layers: every block calls the foundation's SDPA ``Attention.forward`` unchanged."""
    cfg = small(every=0)
    model = MoETransformerLM(cfg).eval()
    assert all(b.attn_mode == "sdpa" for b in model.blocks)
    ids_BS = torch.randint(0, 40, (2, 12))
    mask_BS = torch.ones(2, 12, dtype=torch.bool)
    mask_BS[1, 7:] = False
    with torch.no_grad():
        x_BSD = model.embed(ids_BS)
        cos, sin = model.rope_cos, model.rope_sin
        for block in model.blocks:
            a_BSD = block.attn_norm(x_BSD)
            q = block.attn.wq(a_BSD).view(2, 12, 4, 8).transpose(1, 2)
            k = block.attn.wk(a_BSD).view(2, 12, 2, 8).transpose(1, 2)
            v = block.attn.wv(a_BSD).view(2, 12, 2, 8).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BS[:, None, None, :])
            x_BSD = x_BSD + block.attn.wo(out.transpose(1, 2).reshape(2, 12, -1))
            h_BSD = block.ffn_norm(x_BSD)
            if block.is_moe:
                x_BSD = x_BSD + block.ffn(h_BSD.reshape(-1, 32)).y.view_as(x_BSD)
            else:
                x_BSD = x_BSD + block.ffn(h_BSD)
        assert torch.equal(model.encode(ids_BS, mask_BS)[0], model.norm(x_BSD))


def test_reuse_backward_reaches_the_previous_layer_queries_only_through_its_probs():
    model = MoETransformerLM(small(p=0.0, moe=MoEConfig(every=0)))
    ids_BS = torch.randint(0, 40, (2, 12))
    model(ids_BS, ids_BS).loss.backward()
    assert model.blocks[1].attn.wq.weight.grad is None  # never recomputed: Q/K unused
    assert model.blocks[1].attn.wv.weight.grad is not None
    assert model.blocks[0].attn.wq.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("reuse", "message"),
    [
        (AttnReuseConfig(every=-1), "model.attn_reuse.every must be >= 0"),
        (AttnReuseConfig(every=2, recompute_prob=1.5), "recompute_prob must be in [0, 1]"),
        (AttnReuseConfig(every=2, inference="rcr"), "one letter r/c per reuse layer (2 here)"),
        (AttnReuseConfig(every=2, inference="xx"), "got 'xx'"),
    ],
)
def test_bad_reuse_settings_name_the_key(reuse, message):
    with pytest.raises(UserError) as info:
        dataclasses.replace(small(every=0), attn_reuse=reuse).validate()
    assert message in str(info.value)


def test_shipped_attnreuse_recipe_trains(tmp_path, shrink_shipped_recipe):
    from myriad.config import load_recipe
    from myriad.train import run_pretrain
    from myriad.train.metrics import read_metrics

    cfg = load_recipe("tiny-zh-attnreuse", shrink_shipped_recipe)
    assert cfg.model.attn_reuse == AttnReuseConfig(every=2, recompute_prob=0.25)
    result = run_pretrain(cfg, tmp_path / "run", log=lambda _: None)
    heldout = [r for r in read_metrics(result.metrics_path) if r["kind"] == "heldout"]
    assert [r["step"] for r in heldout] == [0, 16, 32]
    assert result.final_heldout_loss < result.first_heldout_loss
