"""The Transformer's dense parts against naive references, parameter counts against numel."""

import math

import pytest
import torch
import torch.nn.functional as F

from myriad.model import IGNORE_INDEX, ModelConfig, MoEConfig, MoETransformerLM, count_parameters
from myriad.model.layers import Attention, RMSNorm, apply_rotary, rotary_tables


def tiny(**kw) -> ModelConfig:
    moe = kw.pop("moe", MoEConfig(num_experts=4, top_k=2, d_expert=24, every=2))
    base = dict(vocab_size=50, d_model=32, n_layers=4, n_heads=4, d_ff=48, max_seq_len=16)
    base.update(kw)
    return ModelConfig(moe=moe, **base)


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref, atol=1e-6, rtol=1e-5)


def test_rotary_is_a_rotation_by_position_times_frequency():
    head_dim, seq = 8, 5
    cos, sin = rotary_tables(seq, head_dim, 10000.0)
    x = torch.randn(1, 1, seq, head_dim)
    out = apply_rotary(x, cos, sin)
    for pos in range(seq):
        for i in range(head_dim // 2):
            angle = pos / 10000.0 ** (2 * i / head_dim)
            a, b = x[0, 0, pos, i].item(), x[0, 0, pos, i + head_dim // 2].item()
            expected = (
                a * math.cos(angle) - b * math.sin(angle),
                b * math.cos(angle) + a * math.sin(angle),
            )
            got = (out[0, 0, pos, i].item(), out[0, 0, pos, i + head_dim // 2].item())
            assert got == pytest.approx(expected, abs=1e-5)


def naive_attention(attn: Attention, x, cos, sin, causal, pad_mask=None):
    B, S, _ = x.shape
    H, G, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = apply_rotary((x @ attn.wq.weight.T).view(B, S, H, Dh).transpose(1, 2), cos, sin)
    k = apply_rotary((x @ attn.wk.weight.T).view(B, S, G, Dh).transpose(1, 2), cos, sin)
    v = (x @ attn.wv.weight.T).view(B, S, G, Dh).transpose(1, 2)
    out = torch.zeros(B, H, S, Dh)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            scores = q[b, h] @ k[b, g].T / math.sqrt(Dh)
            allowed = torch.ones(S, S, dtype=torch.bool)
            if causal:
                allowed &= torch.ones(S, S, dtype=torch.bool).tril()
            if pad_mask is not None:
                allowed &= pad_mask[b][None, :]
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[b, h] = scores.softmax(-1) @ v[b, g]
    return out.transpose(1, 2).reshape(B, S, H * Dh) @ attn.wo.weight.T


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_naive_loop(causal, kv_heads, padded):
    attn = Attention(32, 4, kv_heads, causal)
    cos, sin = rotary_tables(16, 8, 10000.0)
    x = torch.randn(2, 7, 32, requires_grad=True)
    pad = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool) if padded else None
    got = attn(x, cos, sin, pad)
    ref = naive_attention(attn, x, cos, sin, causal, pad)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g_got, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        tiny(tie_embeddings=False, n_kv_heads=2),
        tiny(moe=MoEConfig(num_experts=6, top_k=1, d_expert=16, every=1, num_shared_experts=2)),
        tiny(moe=MoEConfig(every=0)),
    ],
)
def test_parameter_count_formula_matches_numel(cfg):
    model = MoETransformerLM(cfg)
    counts = count_parameters(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    moe = cfg.moe
    if moe.every:
        idle = moe.num_experts - moe.top_k
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        assert counts.total - counts.active == n_moe * idle * 3 * cfg.d_model * moe.d_expert
    else:
        assert counts.total == counts.active


def test_causal_lm_ignores_the_future_and_mlm_sees_it():
    ids = torch.randint(0, 50, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 50
    for objective, future_matters in (("clm", False), ("mlm", True)):
        model = MoETransformerLM(tiny(objective=objective)).eval()
        a = model(ids).logits[0, :6]
        b = model(changed).logits[0, :6]
        assert (not torch.allclose(a, b, atol=1e-6)) == future_matters


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_loss_on_labelled_positions_equals_full_cross_entropy(objective):
    model = MoETransformerLM(tiny(objective=objective, moe=MoEConfig(aux_loss_coef=0.0)))
    ids = torch.randint(0, 50, (2, 12))
    labels = ids.clone()
    labels[torch.rand(labels.shape) < 0.5] = IGNORE_INDEX
    out = model(ids, labels)
    logits = model(ids).logits
    if objective == "clm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    ref = F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.lm_loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.lm_loss, atol=0, rtol=0)


def test_aux_losses_and_loads_reach_the_caller():
    cfg = tiny(moe=MoEConfig(num_experts=4, top_k=2, d_expert=24, every=1, z_loss_coef=1e-3))
    out = MoETransformerLM(cfg)(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))
    assert len(out.tokens_per_expert) == cfg.n_layers
    assert all(int(t.sum()) == 2 * 8 * 2 for t in out.tokens_per_expert)
    expected = out.lm_loss + 0.01 * out.load_balance_loss + 1e-3 * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    assert out.load_balance_loss.item() >= cfg.n_layers * 0.99  # Switch loss is >= 1 per layer


def test_too_long_sequence_is_rejected():
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        MoETransformerLM(tiny())(torch.zeros(1, 17, dtype=torch.long))
