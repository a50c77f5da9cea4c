"""Growth: a wider and/or deeper model computes the small model's function before training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_train_support import max_logit_gap, tiny_config, use_fake_data

from myriad.errors import UserError
from myriad.model import ModelConfig, MoEConfig, MoETransformerLM
from myriad.train.growth import grow_state, place_layers
from myriad.train.metrics import read_metrics
from myriad.train.pretrain import run_pretrain


def _small(objective="clm", tie=True, kv=0, router="hidden") -> ModelConfig:
    return ModelConfig(
        objective=objective,
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=kv,
        d_ff=64,
        max_seq_len=16,
        init_std=0.1,
        tie_embeddings=tie,
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=32, every=2, router_input=router),
    )


def _grown(small: ModelConfig, d_model=32, n_layers=2, d_ff=64, d_expert=32) -> ModelConfig:
    heads = d_model // (small.d_model // small.n_heads)
    group = small.n_heads // (small.n_kv_heads or small.n_heads)
    kv = heads // group if small.n_kv_heads else 0
    moe = dataclasses.replace(small.moe, d_expert=d_expert)
    return dataclasses.replace(
        small, d_model=d_model, n_heads=heads, n_kv_heads=kv, n_layers=n_layers, d_ff=d_ff, moe=moe
    )


def _trained_like(cfg: ModelConfig) -> MoETransformerLM:
    torch.manual_seed(3)
    model = MoETransformerLM(cfg)
    with torch.no_grad():  # non-trivial gains, so a wrong RMSNorm rescale would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _grow(small_cfg: ModelConfig, big_cfg: ModelConfig):
    small = _trained_like(small_cfg)
    big = MoETransformerLM(big_cfg).eval()
    fresh = {k: v.clone() for k, v in big.state_dict().items()}
    src = {k: v.clone() for k, v in small.state_dict().items()}
    big.load_state_dict(grow_state(src, small_cfg, big_cfg, fresh, "test"))
    return small, big


@pytest.mark.parametrize(
    "dims",
    [
        dict(d_model=64),  # wider residual stream and more heads
        dict(d_ff=96, d_expert=48),  # wider FFNs and experts
        dict(n_layers=4),  # deeper
        dict(d_model=64, n_layers=4, d_ff=128, d_expert=64),  # all at once
    ],
)
@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(objective="mlm", tie=False),
        dict(kv=2),
        dict(router="word"),
        dict(router="routing_embedding"),
    ],
)
def test_grown_model_computes_the_small_models_function(dims, variant):
    small_cfg = _small(**variant)
    small, big = _grow(small_cfg, _grown(small_cfg, **dims))
    assert max_logit_gap(small, big) <= 1e-4


def test_new_units_receive_gradient():
    small_cfg = _small()
    _, big = _grow(small_cfg, _grown(small_cfg, d_model=64, n_layers=4, d_ff=128, d_expert=64))
    big.train()
    ids_BS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    out = big(ids_BS, ids_BS)
    assert out.loss is not None
    out.loss.backward()
    new_block = big.blocks[1]  # an identity block (placed: 0, None, None, 1)
    assert torch.equal(new_block.attn.wo.weight, torch.zeros_like(new_block.attn.wo.weight))
    grad = new_block.attn.wo.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    wo_grad = big.blocks[0].attn.wo.weight.grad
    assert wo_grad is not None and wo_grad[32:].abs().sum() > 0  # rows of the new channels
    down = big.blocks[0].ffn.down.weight.grad
    assert down is not None and down[:, 64:].abs().sum() > 0  # columns of the new hidden units


def test_layer_placement_by_hand():
    small = _small()  # kinds: dense, MoE
    four = dataclasses.replace(small, n_layers=4)  # dense, MoE, dense, MoE
    # Old layer i goes to the first slot of its kind at or after i * 4 / 2.
    assert place_layers(small, four, "t") == [0, None, None, 1]
    eight = dataclasses.replace(small, n_layers=8)
    assert place_layers(four, eight, "t") == [0, None, None, 1, 2, None, None, 3]


def test_growth_errors_name_the_key():
    small_cfg = _small()
    fresh = MoETransformerLM(dataclasses.replace(small_cfg, d_model=64)).state_dict()
    src = MoETransformerLM(small_cfg).state_dict()
    with pytest.raises(UserError, match="set model.n_heads = 8"):
        grow_state(src, small_cfg, dataclasses.replace(small_cfg, d_model=64), fresh, "t")
    thinner = dataclasses.replace(small_cfg, d_ff=32)
    with pytest.raises(UserError, match="model.d_ff shrinks"):
        grow_state(src, small_cfg, thinner, MoETransformerLM(thinner).state_dict(), "t")


def test_pretrain_init_from_grows_and_trains(tmp_path, monkeypatch):
    use_fake_data(monkeypatch)
    small_cfg = tiny_config(steps=4)
    small = run_pretrain(small_cfg, tmp_path / "small", log=lambda _: None)
    moe = dataclasses.replace(small_cfg.model.moe, d_expert=48)
    model = dataclasses.replace(
        small_cfg.model, d_model=64, n_heads=8, n_layers=3, d_ff=128, moe=moe
    )
    train = dataclasses.replace(small_cfg.train, init_from=str(tmp_path / "small"), steps=3)
    lines: list[str] = []
    cfg = dataclasses.replace(small_cfg, model=model, train=train)
    big = run_pretrain(cfg, tmp_path / "big", log=lines.append)
    assert any("hot-start (grow)" in line for line in lines)

    def heldout(result):
        return [r["heldout_loss"] for r in read_metrics(result.metrics_path) if "heldout_loss" in r]

    assert abs(heldout(big)[0] - heldout(small)[-1]) <= 1e-4
    assert heldout(big)[-1] < heldout(big)[0]
