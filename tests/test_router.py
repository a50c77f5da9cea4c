"""The top-k router against hand formulas: weights, Switch loss, z-loss, aux-free bias."""

import math

import pytest
import torch

from myriad.model.config import MoEConfig
from myriad.model.router import TopKRouter

TOL = dict(rtol=1e-5, atol=1e-5)


def make_router(d=16, **kw) -> TopKRouter:
    cfg = MoEConfig(**{"num_experts": 6, "top_k": 2, **kw})
    router = TopKRouter(d, cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_weights_are_softmax_of_the_chosen_experts(norm_topk, top_k):
    router = make_router(top_k=top_k, norm_topk=norm_topk)
    x = torch.randn(20, 16)
    out = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    for t in range(20):
        chosen = sorted(range(6), key=lambda e: -probs[t, e].item())[:top_k]
        assert sorted(out.expert_ids_TK[t].tolist()) == sorted(chosen)
        w = probs[t, out.expert_ids_TK[t]]
        if norm_topk and top_k > 1:
            w = w / w.sum()
        torch.testing.assert_close(out.weights_TK[t], w, **TOL)
    counts = torch.tensor([(out.expert_ids_TK == e).sum().item() for e in range(6)])
    assert torch.equal(out.counts_E, counts)


def test_switch_loss_matches_hand_formula():
    router = make_router()
    x = torch.randn(30, 16)
    out = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    ids = out.expert_ids_TK.tolist()
    expected = 0.0
    for e in range(6):
        f_e = sum(row.count(e) for row in ids) / (30 * 2)
        p_e = probs[:, e].mean().item()
        expected += 6 * f_e * p_e
    assert out.load_balance_loss.item() == pytest.approx(expected, rel=1e-5)


def test_switch_loss_is_one_when_uniform_and_z_loss_is_log_e_squared():
    router = make_router()
    torch.nn.init.zeros_(router.weight)
    out = router(torch.randn(10, 16))
    assert out.load_balance_loss.item() == pytest.approx(1.0, rel=1e-6)
    assert out.z_loss.item() == pytest.approx(math.log(6) ** 2, rel=1e-6)


def test_z_loss_matches_hand_formula():
    router = make_router()
    x = torch.randn(12, 16)
    logits = (x @ router.weight.T).double()
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 12
    assert router(x).z_loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bias_update_rate", [0.0, 0.01])  # top-k ids, or its own argmax
def test_z_loss_and_its_gradient_match_logsumexp_even_for_peaked_logits(bias_update_rate):
    router = make_router(bias_update_rate=bias_update_rate)
    with torch.no_grad():
        router.weight.mul_(40.0)  # logits in the tens: most probabilities underflow to ~0
        router.selection_bias_E[2] = 5.0  # with the bias on, selection differs from the argmax
    x = torch.randn(12, 16)
    router(x).z_loss.backward()
    weight = router.weight.detach().double().requires_grad_()
    expected = torch.logsumexp(x.double() @ weight.T, dim=-1).pow(2).mean()
    expected.backward()
    assert router(x).z_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(router.weight.grad.double(), weight.grad, rtol=1e-5, atol=1e-6)


def test_losses_have_gradients_to_the_router():
    router = make_router()
    out = router(torch.randn(12, 16))
    (out.load_balance_loss + out.z_loss).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_bias_changes_selection_but_not_weights():
    router = make_router(bias_update_rate=0.01)
    x = torch.randn(16, 16)
    before = router(x)
    router.selection_bias_E[4] = 10.0  # expert 4 now wins every token's selection
    after = router(x)
    assert (after.expert_ids_TK == 4).any(dim=-1).all()
    assert not torch.equal(before.expert_ids_TK, after.expert_ids_TK)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    w = probs.gather(1, after.expert_ids_TK)
    torch.testing.assert_close(after.weights_TK, w / w.sum(-1, keepdim=True), **TOL)


def test_bias_is_ignored_when_rate_is_zero():
    router = make_router(bias_update_rate=0.0)
    x = torch.randn(16, 16)
    before = router(x).expert_ids_TK
    router.selection_bias_E[4] = 10.0
    assert torch.equal(router(x).expert_ids_TK, before)


def test_update_bias_moves_toward_balance():
    router = make_router(bias_update_rate=0.1)
    load = torch.tensor([10, 0, 5, 5, 3, 7])  # mean 5
    router.update_bias(load)
    torch.testing.assert_close(
        router.selection_bias_E, torch.tensor([-0.1, 0.1, 0.0, 0.0, 0.1, -0.1]), **TOL
    )
    off = make_router(bias_update_rate=0.0)
    off.update_bias(load)
    assert torch.equal(off.selection_bias_E, torch.zeros(6))
