"""The MoE layer against a per-token Python loop (forward and gradients), HF Mixtral and SwiGLU.

The reference runs in float64 from copies of the layer's weights: each token gets its softmax,
its top-k, each chosen expert's SwiGLU and the weighted sum, one token at a time.
"""

import pytest
import torch
import torch.nn.functional as F

from myriad.model import cpu_kernels, gemm_batch, moe_dispatch
from myriad.model.config import MoEConfig
from myriad.model.layers import SwiGLU
from myriad.model.moe import MoEFeedForward, choose_strategy
from myriad.model.moe_dispatch import STRATEGIES, padded_tiers

TOL = dict(rtol=1e-5, atol=1e-5)
D, FF = 16, 8


@pytest.fixture(autouse=True)
def _skip_strategies_this_machine_lacks(request):
    strategy = getattr(request.node, "callspec", None) and request.node.callspec.params.get(
        "strategy"
    )
    if strategy == "cpu_kernel" and not cpu_kernels.available():
        pytest.skip("Myriad's CPU kernel cannot be built here (no C compiler or no AVX2)")
    if strategy == "gemm_batch" and not gemm_batch.available():
        pytest.skip("this PyTorch build has no MKL")


def make_layer(d=D, **kw) -> MoEFeedForward:
    cfg = MoEConfig(**{"num_experts": 6, "top_k": 2, "d_expert": FF, **kw})
    layer = MoEFeedForward(d, cfg)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(std=0.5 if name.startswith("router") else 0.3)
    return layer


def reference(layer: MoEFeedForward, x: torch.Tensor):
    """Per-token loop in float64; returns output, losses, dropped fraction and leaf params."""
    cfg, F_ = layer.cfg, layer.cfg.d_expert
    params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    x = x.detach().double().requires_grad_()
    logits = x @ params["router.weight"].T
    probs = torch.softmax(logits, dim=-1)
    scores = probs + layer.router.selection_bias_E.double() if cfg.bias_update_rate > 0 else probs
    capacity = layer.capacity(x.shape[0]) or x.shape[0] * cfg.top_k
    used, rows, counts, kept = [0] * cfg.num_experts, [], [0] * cfg.num_experts, 0
    for t in range(x.shape[0]):
        ids = torch.topk(scores[t], cfg.top_k).indices.tolist()
        w = probs[t, ids]
        if cfg.norm_topk and cfg.top_k > 1:
            w = w / w.sum()
        y_t = x.new_zeros(x.shape[1])
        for k, e in enumerate(ids):
            counts[e] += 1
            if used[e] >= capacity:
                continue
            used[e] += 1
            kept += 1
            h = x[t] @ params["w_in_EDF2"][e]
            y_t = y_t + w[k] * ((F.silu(h[:F_]) * h[F_:]) @ params["w_out_EFD"][e])
        rows.append(y_t)
    y = torch.stack(rows)
    if layer.shared is not None:
        s = {k: v for k, v in params.items() if k.startswith("shared.")}
        gate, up, down = (s[f"shared.{n}.weight"] for n in ("gate", "up", "down"))
        y = y + (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    frac = torch.tensor(counts, dtype=torch.float64) / (x.shape[0] * cfg.top_k)
    lb = cfg.num_experts * (frac * probs.mean(0)).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    dropped = 1 - kept / (x.shape[0] * cfg.top_k)
    return y, lb, z, dropped, x, params


def check_against_reference(layer: MoEFeedForward, x: torch.Tensor, strategy: str):
    layer.dispatch_strategy = strategy
    x = x.clone().requires_grad_()
    g = torch.randn_like(x)
    out = layer(x)
    ((out.y * g).sum() + 0.3 * out.load_balance_loss + 0.2 * out.z_loss).backward()
    y, lb, z, dropped, x_ref, params = reference(layer, x)
    ((y * g.double()).sum() + 0.3 * lb + 0.2 * z).backward()
    torch.testing.assert_close(out.y, y.float(), **TOL)
    torch.testing.assert_close(out.load_balance_loss, lb.float(), **TOL)
    torch.testing.assert_close(out.z_loss, z.float(), **TOL)
    assert out.dropped_fraction.item() == pytest.approx(dropped, abs=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad.float(), **TOL)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad.float(), **TOL, msg=name)
    return out


MODES = {
    "top2-norm": {},
    "top2-no-norm": {"norm_topk": False},
    "top1": {"top_k": 1},
    "top3-norm": {"top_k": 3},
    "capacity": {"capacity_factor": 1.0},
    "capacity-top1": {"capacity_factor": 0.5, "top_k": 1},
    "shared": {"num_shared_experts": 1},
    "aux-free-bias": {"bias_update_rate": 0.01},
}


@pytest.mark.parametrize("strategy", [*STRATEGIES, "auto"])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_per_token_reference(mode, strategy):
    layer = make_layer(**MODES[mode])
    layer.max_groups = 4  # so "chunked" really splits the 6 experts
    if mode == "aux-free-bias":
        layer.router.selection_bias_E.copy_(torch.tensor([0.0, 0.3, 0.0, -0.2, 0.1, 0.0]))
    check_against_reference(layer, torch.randn(24, D), strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_capacity_drops_the_later_tokens(strategy):
    layer = make_layer(num_experts=4, top_k=1, capacity_factor=1.0)  # capacity 8*1/4 = 2
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0  # every token (all-positive input) prefers expert 0
    layer.dispatch_strategy = strategy
    x = torch.rand(8, D) + 0.1
    out = layer(x)
    assert out.tokens_per_expert_E.tolist() == [8, 0, 0, 0]
    assert out.dropped_fraction.item() == pytest.approx(6 / 8)
    assert (out.y[:2].abs().sum(-1) > 0).all()  # the first two in token order are kept
    assert torch.equal(out.y[2:], torch.zeros(6, D))
    check_against_reference(layer, x, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expert_without_tokens_gets_zero_gradient(strategy):
    layer = make_layer(bias_update_rate=0.01)
    layer.router.selection_bias_E[2] = -10.0  # expert 2 is never selected
    out = check_against_reference(layer, torch.randn(16, D), strategy)
    assert out.tokens_per_expert_E[2] == 0
    assert torch.equal(layer.w_in_EDF2.grad[2], torch.zeros(D, 2 * FF))
    assert torch.equal(layer.w_out_EFD.grad[2], torch.zeros(FF, D))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_expert_equals_dense_swiglu(strategy):
    layer = make_layer(num_experts=1, top_k=1)
    layer.dispatch_strategy = strategy
    dense = SwiGLU(D, FF)
    with torch.no_grad():
        dense.gate.weight.copy_(layer.w_in_EDF2[0, :, :FF].T)
        dense.up.weight.copy_(layer.w_in_EDF2[0, :, FF:].T)
        dense.down.weight.copy_(layer.w_out_EFD[0].T)
    x = torch.randn(10, D)
    torch.testing.assert_close(layer(x).y, dense(x), **TOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_1536_experts(strategy):
    layer = make_layer(d=8, num_experts=1536, top_k=1, d_expert=4)
    assert layer.max_groups == 1023  # chunked: 1023 + 513 experts
    check_against_reference(layer, torch.randn(64, 8), strategy)


def test_auto_strategy_by_shape(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    if cpu_kernels.available():  # Myriad's own kernel: every fp32 CPU shape
        for rows, experts in ((4096, 8), (4096, 64), (2048, 256), (8 * 8192, 8)):
            assert choose_strategy(rows, experts, cpu, torch.float32) == "cpu_kernel"
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)  # no C compiler
    if gemm_batch.available():  # MKL's grouped batch GEMM for many small experts in fp32
        assert choose_strategy(4096, 64, cpu, torch.float32) == "gemm_batch"
        assert choose_strategy(2048, 256, cpu, torch.float32) == "gemm_batch"
    assert choose_strategy(4096, 8, cpu, torch.float32) == "padded"  # 512 rows per expert
    assert choose_strategy(4096, 64, cpu, torch.bfloat16) == "padded"
    monkeypatch.setattr(gemm_batch, "available", lambda: False)  # a build without MKL
    assert choose_strategy(4096, 64, cpu, torch.float32) == "padded"
    assert choose_strategy(4096, 8, cpu, torch.float32) == "padded"
    assert choose_strategy(8 * 8192, 8, cpu, torch.float32) == "grouped"
    assert choose_strategy(2048, 256, cpu, torch.float32) == "padded"
    assert choose_strategy(16384 * 6, 64, cuda, torch.bfloat16) == "grouped"
    assert choose_strategy(65536, 1536, cuda, torch.bfloat16) == "padded"
    assert choose_strategy(65536 * 256, 1536, cuda, torch.bfloat16) == "padded"
    assert choose_strategy(16384 * 6, 64, cuda, torch.float32) == "padded"


def test_unknown_strategy_is_an_error():
    layer = make_layer()
    layer.dispatch_strategy = "magic"
    with pytest.raises(ValueError, match="dispatch_strategy"):
        layer(torch.randn(4, D))


def mixtral_block(layer: MoEFeedForward, implementation: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = layer.cfg
    hf_cfg = MixtralConfig(
        hidden_size=layer.w_in_EDF2.shape[1],
        intermediate_size=cfg.d_expert,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
    )
    hf_cfg._experts_implementation = implementation  # how transformers 5 picks the experts code
    block = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.w_in_EDF2.transpose(1, 2))
        block.experts.down_proj.copy_(layer.w_out_EFD.transpose(1, 2))
    return block.eval()


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("strategy", ["grouped", "padded"])
def test_matches_hf_mixtral(implementation, strategy):
    pytest.importorskip("transformers")
    layer = make_layer(d=32, num_experts=8, top_k=2, d_expert=16, norm_topk=True)
    layer.dispatch_strategy = strategy
    block = mixtral_block(layer, implementation)
    x = torch.randn(2, 12, 32)
    torch.testing.assert_close(layer(x.view(-1, 32)).y, block(x).view(-1, 32), **TOL)


def test_padded_tiers_minimise_rows():
    counts = torch.tensor([10, 2, 2, 2, 2, 2, 3, 2])
    c1, heavy, c2 = padded_tiers(counts, heavy_cost_rows=0)
    assert (c1, heavy.tolist(), c2) == (3, [0], 7)  # 8*3 + 1*7 = 31 rows instead of 8*10
    c1, heavy, c2 = padded_tiers(counts, heavy_cost_rows=100)
    assert (c1, heavy.tolist(), c2) == (10, [], 0)  # tier 2 too dear: plain padding


@pytest.mark.parametrize("mode", ["top2-norm", "top1", "shared"])
def test_padded_second_tier_matches_reference(mode, monkeypatch):
    monkeypatch.setitem(moe_dispatch.HEAVY_EXPERT_COST_ROWS, "cpu", 0)
    layer = make_layer(**MODES[mode])
    x = torch.randn(40, D)
    c1, heavy, c2 = padded_tiers(layer.router(x).counts_E, 0)
    assert heavy.numel() > 0 and c2 > 0  # the test really exercises tier 2
    check_against_reference(layer, x, "padded")


def _train_step(layer: MoEFeedForward, x: torch.Tensor, g: torch.Tensor) -> None:
    out = layer(x)
    ((out.y * g).sum() + 0.3 * out.load_balance_loss + 0.2 * out.z_loss).backward()


def _reference_grads(layer: MoEFeedForward, x: torch.Tensor, g: torch.Tensor) -> dict:
    y, lb, z, _, _, params = reference(layer, x)
    ((y * g.double()).sum() + 0.3 * lb + 0.2 * z).backward()
    return {name: p.grad.float() for name, p in params.items()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reused_grad_buffers_stay_exact(strategy, monkeypatch):
    """CPU weight-gradient buffers are reused across steps only while nothing else holds them."""
    monkeypatch.setitem(moe_dispatch.HEAVY_EXPERT_COST_ROWS, "cpu", 0)  # padded: tier 2 too
    layer = make_layer()
    layer.dispatch_strategy = strategy
    names = ("w_in_EDF2", "w_out_EFD")
    x1, x2, x3 = torch.randn(40, D), torch.randn(40, D), torch.randn(40, D)
    g1, g2, g3 = torch.randn(40, D), torch.randn(40, D), torch.randn(40, D)
    ref1, ref2, ref3 = (_reference_grads(layer, x, g) for x, g in ((x1, g1), (x2, g2), (x3, g3)))

    _train_step(layer, x1, g1)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref1[name], **TOL, msg=name)
    ptrs = {n: getattr(layer, n).grad.data_ptr() for n in names}
    layer.zero_grad(set_to_none=True)

    _train_step(layer, x2, g2)  # gradients were set to None: the buffers are reused
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref2[name], **TOL, msg=name)
    if strategy in ("padded", "loop", "gemm_batch", "cpu_kernel"):  # wgrad takes out=: reused
        assert all(getattr(layer, n).grad.data_ptr() == ptrs[n] for n in names)
    else:
        assert not {"w_in", "w_out"} & set(layer._grad_bufs._bufs)

    held = {n: getattr(layer, n).grad for n in names}  # e.g. a hook or a logger keeps them
    _train_step(layer, x3, g3)  # no reset: accumulates into the held buffers, never over them
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref2[name] + ref3[name], **TOL, msg=name)
    layer.zero_grad(set_to_none=True)
    _train_step(layer, x1, g1)  # the old grads are still referenced: fresh memory, old intact
    for n in names:
        torch.testing.assert_close(held[n], ref2[n] + ref3[n], **TOL, msg=n)
        torch.testing.assert_close(getattr(layer, n).grad, ref1[n], **TOL, msg=n)


def test_grad_buffers_can_be_turned_off():
    layer = make_layer()
    layer.reuse_cpu_grad_buffers = False
    layer.dispatch_strategy = "padded"
    x, g = torch.randn(40, D), torch.randn(40, D)
    ref = _reference_grads(layer, x, g)
    _train_step(layer, x, g)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], **TOL, msg=name)
    assert not layer._grad_bufs._bufs  # the layer holds no memory of its own


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_recomputing_activations_matches_reference(strategy, monkeypatch):
    """The backward that recomputes silu(gate) (the CUDA path) is exact on the CPU too."""
    monkeypatch.setattr(moe_dispatch, "SAVE_ACTIVATIONS_ON_CPU", False)
    check_against_reference(make_layer(), torch.randn(40, D), strategy)
