"""GPU checks (skipped without CUDA): every dispatch strategy on the device against the CPU.

CI has no GPU; these run on a lent H100/H200 through ``benchmarks/gpu_check.sh``.
"""

import pytest
import torch

from myriad.model import ModelConfig, MoEConfig, MoEFeedForward, MoETransformerLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _exact_fp32():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: compare fp32 with fp32
    yield
    torch.set_float32_matmul_precision(old)


def forward_backward(layer: MoEFeedForward, x: torch.Tensor, strategy: str):
    layer.zero_grad(set_to_none=True)
    layer.dispatch_strategy = strategy
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.y.float().square().sum().backward()
    grads = [x.grad] + [p.grad for p in (layer.router.weight, layer.w_in_EDF2, layer.w_out_EFD)]
    # Copies: moving the layer to the GPU later moves its .grad tensors in place.
    return out.y.detach().float().clone(), [g.float().clone() for g in grads]


def make_layer(num_experts: int, top_k: int, capacity_factor: float = 0.0) -> MoEFeedForward:
    cfg = MoEConfig(
        num_experts=num_experts, top_k=top_k, d_expert=32, capacity_factor=capacity_factor
    )
    layer = MoEFeedForward(64, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("strategy", ["padded", "loop"])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_fp32_strategies_on_cuda_match_cpu(strategy, capacity_factor):
    layer = make_layer(16, 2, capacity_factor)
    x = torch.randn(300, 64)
    y_ref, g_ref = forward_backward(layer, x, "loop")
    layer.cuda()
    y, g = forward_backward(layer, x.cuda(), strategy)
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("num_experts", "strategies"), [(16, ["grouped", "padded"]), (1536, ["chunked", "padded"])]
)
def test_bf16_strategies_agree_with_fp32_reference(num_experts, strategies):
    layer = make_layer(num_experts, 1)
    with torch.no_grad():  # bf16-representable values, so both runs route the same way
        for p in layer.parameters():
            p.copy_(p.bfloat16().float())
    x = torch.randn(4096, 64).bfloat16().float()
    y_ref, g_ref = forward_backward(layer, x, "padded")
    layer.cuda().to(torch.bfloat16)
    layer.router.float()
    for strategy in strategies:
        y, g = forward_backward(layer, x.cuda().bfloat16(), strategy)
        # bf16 keeps 8 bits of mantissa: compare relative to the tensors' scale.
        assert (y.cpu() - y_ref).norm() / y_ref.norm() < 2e-2, strategy
        for a, b in zip(g[2:], g_ref[2:], strict=True):
            assert (a.cpu() - b).norm() / b.norm() < 3e-2, strategy


def test_bf16_autocast_training_step_matches_fp32():
    cfg = ModelConfig(
        vocab_size=500, d_model=128, n_layers=2, n_heads=4, d_ff=256, max_seq_len=64,
        moe=MoEConfig(num_experts=8, top_k=2, d_expert=128, every=1),
    )  # fmt: skip
    model = MoETransformerLM(cfg).cuda()
    ids = torch.randint(0, 500, (8, 64), device="cuda")
    labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.15, ids, -100)
    ref = model(ids, labels).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels)
    out.loss.backward()
    assert abs(out.loss.item() - ref.item()) / ref.item() < 1e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
