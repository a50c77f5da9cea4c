"""The training step: accumulation equals one big batch, clipping reports the pre-clip norm."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_train_support import counting_batch, tiny_config

from myriad.model import MoETransformerLM
from myriad.train.device import autocast_factory
from myriad.train.optim import build_optimizer, build_scheduler
from myriad.train.step import TrainStep, accumulate_gradients

CPU = torch.device("cpu")


def _model_without_switch_loss():
    # The Switch balance loss is a product of per-batch means, so it is not additive over
    # micro-batches; every other term (mean LM loss over equal-size halves, z-loss) is.
    cfg = tiny_config()
    moe = dataclasses.replace(cfg.model.moe, aux_loss_coef=0.0, z_loss_coef=0.01)
    torch.manual_seed(0)
    return MoETransformerLM(dataclasses.replace(cfg.model, moe=moe))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_half_batches_equal_one_full_batch():
    model = _model_without_switch_loss()
    full = counting_batch(8, seed=1, index=0)
    halves = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
    fp32 = autocast_factory("fp32", CPU)

    one = accumulate_gradients(model, [full], fp32, CPU)
    grads_one = _grads(model)
    model.zero_grad(set_to_none=True)
    two = accumulate_gradients(model, halves, fp32, CPU)
    grads_two = _grads(model)

    assert grads_one.keys() == grads_two.keys() and len(grads_one) > 10
    for name in grads_one:
        torch.testing.assert_close(grads_two[name], grads_one[name], rtol=1e-5, atol=1e-5)
    assert two.loss.item() == pytest.approx(one.loss.item(), rel=1e-5)
    assert two.tokens == one.tokens == 8 * 16
    for a, b in zip(one.tokens_per_expert, two.tokens_per_expert, strict=True):
        assert torch.equal(a, b)  # routing is per token: loads add up exactly


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_step_reports_preclip_norm_and_lr(grad_clip):
    cfg = tiny_config(grad_clip=grad_clip, warmup_steps=4)
    torch.manual_seed(0)
    model = MoETransformerLM(cfg.model)
    opt = build_optimizer(model, cfg.train, CPU)
    sched = build_scheduler(opt, cfg.train)
    step = TrainStep(
        model, opt, sched, grad_clip=grad_clip, autocast=autocast_factory("auto", CPU), device=CPU
    )
    batch = counting_batch(4, seed=0, index=0)
    # Reference norm from a copy, before the step touches anything.
    ref = MoETransformerLM(cfg.model)
    ref.load_state_dict(model.state_dict())
    ref(batch["input_ids"], batch["labels"]).loss.backward()
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None])
    )

    m = step([batch])
    assert m.grad_norm == pytest.approx(norm.item(), rel=1e-5)
    assert m.lr == pytest.approx(cfg.train.lr / 4)  # first warm-up step
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.train.lr * 2 / 4)
    assert all(p.grad is None for p in model.parameters())
    assert len(m.tokens_per_expert) == 2 and all(
        int(t.sum()) == 4 * 16 * 2 for t in m.tokens_per_expert
    )
    bias = model.get_buffer("blocks.0.ffn.router.selection_bias_E")
    assert bias.abs().sum() > 0  # router biases were updated from the step's loads
