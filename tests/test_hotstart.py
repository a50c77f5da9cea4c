"""Hot-start by upcycling: an upcycled MoE computes the dense model's function before training."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_train_support import max_logit_gap, tiny_config, use_fake_data

from myriad.cli import build_parser
from myriad.errors import UserError
from myriad.model import ModelConfig, MoEConfig, MoETransformerLM
from myriad.train.hotstart import _check_shapes, choose_mode, upcycle_state
from myriad.train.metrics import read_metrics
from myriad.train.pretrain import run_pretrain


def _cfg(every: int, **moe) -> ModelConfig:
    moe_cfg = dict(num_experts=4, top_k=2, d_expert=64, every=every)
    moe_cfg.update(moe)
    return ModelConfig(
        objective="mlm",
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=16,
        init_std=0.1,
        moe=MoEConfig(**moe_cfg),  # type: ignore[arg-type]
    )


def _dense_model() -> MoETransformerLM:
    torch.manual_seed(1)
    model = MoETransformerLM(_cfg(0))
    with torch.no_grad():  # gains away from 1, so the test would see a misplaced norm
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _upcycle(cfg: ModelConfig, method: str) -> tuple[MoETransformerLM, MoETransformerLM]:
    dense = _dense_model()
    moe = MoETransformerLM(cfg).eval()
    fresh = {k: v.clone() for k, v in moe.state_dict().items()}
    src = {k: v.clone() for k, v in dense.state_dict().items()}
    assert choose_mode(dense.cfg, cfg, src, fresh) == "upcycle"
    moe.load_state_dict(upcycle_state(src, dense.cfg, cfg, fresh, method, "test"))
    return dense, moe


@pytest.mark.parametrize("every", [1, 2])
def test_copy_upcycle_reproduces_the_dense_model(every):
    cfg = _cfg(every)
    assert cfg.moe.norm_topk and cfg.moe.top_k > 1  # combine weights sum to 1
    dense, moe = _upcycle(cfg, "copy")
    assert max_logit_gap(dense, moe) <= 1e-5
    # The router is new (random), not zero: routing still varies from token to token.
    assert moe.blocks[every - 1].ffn.router.weight.abs().sum() > 0


@pytest.mark.parametrize("router_input", ["word", "routing_embedding"])
def test_copy_upcycle_into_word_vector_routing(router_input):
    dense, moe = _upcycle(_cfg(2, router_input=router_input), "copy")  # the word router is new
    assert max_logit_gap(dense, moe) <= 1e-5


def test_split_upcycle_is_exact_with_all_experts_and_a_uniform_router():
    # 4 experts of 32 units; windows start at 0, 16, 32, 48 (wrapping): each unit is in 2
    # experts, outputs are scaled by 64/32 and weighted 1/4, so 1/4 * 2 * 2 = 1.
    cfg = _cfg(1, top_k=4, d_expert=32)
    dense, moe = _upcycle(cfg, "split")
    with torch.no_grad():
        for block in moe.blocks:
            block.ffn.router.weight.zero_()
    assert max_logit_gap(dense, moe) <= 1e-5
    w_out = moe.blocks[0].ffn.w_out_EFD
    assert not torch.equal(w_out[0], w_out[1])  # experts start different


def test_split_upcycle_top2_keeps_per_token_width_and_differs():
    cfg = _cfg(1, top_k=2, d_expert=32)
    dense, moe = _upcycle(cfg, "split")
    gate = dense.blocks[0].ffn.gate.weight
    # Expert 1 holds units 16..47 of the dense gate, as the input half of w_in.
    torch.testing.assert_close(moe.blocks[0].ffn.w_in_EDF2[1, :, :32], gate[16:48].T)
    assert max_logit_gap(dense, moe) > 1e-3  # not exact with 2 of 4 experts: said so in docs


def test_upcycle_errors_name_the_key():
    dense = _dense_model()
    src = dense.state_dict()
    bad = _cfg(1, d_expert=32)
    fresh = MoETransformerLM(bad).state_dict()
    with pytest.raises(UserError, match="model.moe.d_expert"):
        upcycle_state(src, dense.cfg, bad, fresh, "copy", "test")
    wider = dataclasses.replace(_cfg(1), d_model=64, n_heads=8)
    with pytest.raises(UserError, match="model.d_model"):
        upcycle_state(src, dense.cfg, wider, MoETransformerLM(wider).state_dict(), "copy", "t")
    other = MoETransformerLM(dataclasses.replace(_cfg(0), n_heads=2)).state_dict()
    with pytest.raises(UserError, match=r"parameter .*: expected|parameter blocks"):
        _check_shapes({**src, "blocks.0.attn.wq.weight": torch.zeros(3, 3)}, other, "test")


def _run(tmp_path, name, cfg, lines=None):
    return run_pretrain(cfg, tmp_path / name, log=(lines.append if lines is not None else print))


def _heldout(result) -> list[float]:
    return [r["heldout_loss"] for r in read_metrics(result.metrics_path) if r["kind"] == "heldout"]


def test_pretrain_init_from_upcycles_and_trains(tmp_path, monkeypatch):
    use_fake_data(monkeypatch)
    base = tiny_config(steps=4)
    dense_cfg = dataclasses.replace(
        base, model=dataclasses.replace(base.model, moe=MoEConfig(every=0))
    )
    dense = _run(tmp_path, "dense", dense_cfg)
    moe = dataclasses.replace(base.model.moe, d_expert=64)  # = the dense d_ff: copy upcycling
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, moe=moe))
    cfg.train = dataclasses.replace(cfg.train, init_from=str(tmp_path / "dense"), steps=3)
    lines: list[str] = []
    result = _run(tmp_path, "moe", cfg, lines)
    assert any("hot-start (upcycle)" in line for line in lines)
    heldout = _heldout(result)
    assert abs(heldout[0] - _heldout(dense)[-1]) <= 1e-5  # same function before training
    assert heldout[-1] < heldout[0]  # and it trains
    saved = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert saved["data"]["tokenizer"] == str((tmp_path / "dense" / "tokenizer.json").resolve())


def test_pretrain_init_from_rejects_other_vocab_or_tokenizer(tmp_path, monkeypatch):
    use_fake_data(monkeypatch)
    _run(tmp_path, "src", tiny_config(steps=1))
    cfg = tiny_config(steps=1, init_from=str(tmp_path / "src"))
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=65))
    with pytest.raises(UserError, match="model.vocab_size is 65, the source's is 64"):
        run_pretrain(other, tmp_path / "a", log=lambda _: None)
    (tmp_path / "tok.json").write_text('{"other": 1}')
    bad = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tmp_path / "tok.json"))
    )
    with pytest.raises(UserError, match="data.tokenizer"):
        run_pretrain(bad, tmp_path / "b", log=lambda _: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_same_shapes_plain_load_and_cli_flag(tmp_path, monkeypatch):
    use_fake_data(monkeypatch)
    src = _run(tmp_path, "src", tiny_config(steps=2))
    lines: list[str] = []
    result = _run(tmp_path, "again", tiny_config(steps=1, init_from=str(tmp_path / "src")), lines)
    assert any("hot-start (load)" in line for line in lines)
    assert _heldout(result)[0] == pytest.approx(_heldout(src)[-1], abs=1e-6)
    args = build_parser().parse_args(["pretrain", "--init-from", "runs/dense"])
    assert args.init_from == "runs/dense"
