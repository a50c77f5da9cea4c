"""Reduced gradient shards are copied into zeroed gradient shards and added into the others.

The writer alone: a clean shard receives a copy and keeps the copy's sum of squares for the
clip, a used one a sum (and loses it); the blocked sum of squares against float64. Through the
engine in one process, plain, under an evicting budget and with the optimizer step overlapped,
with one and two micro-batches per step (the second one adds): the losses and
gradient norms equal the plain model's, every shard is marked used after the backward and clean
again once its gradient is zeroed.
"""

from __future__ import annotations

import pytest
import torch
from test_engine_support import (
    apply_engine,
    batches,
    build_model,
    make_step,
    run_config,
)
from torch import nn

from myriad.engine.comm import Comm
from myriad.engine.config import EngineConfig
from myriad.engine.engine import apply
from myriad.engine.grad_writer import BLOCK, GradWriter, sum_of_squares

STEPS = 3


def test_copy_into_clean_shard_add_into_used_one():
    writer, grad = GradWriter(), torch.zeros(4)
    writer.write(0, grad, torch.tensor([1.0, -0.0, 2.0, 3.0]), clean=True)
    assert grad.tolist() == [1.0, 0.0, 2.0, 3.0] and writer.squares[0].item() == 14.0
    writer.write(0, grad, torch.tensor([0.5, 1.0, 1.0, -3.0]), clean=False)
    assert grad.tolist() == [1.5, 1.0, 3.0, 0.0]
    assert writer.squares == {}  # the sum no longer holds: the clip sums the shard itself
    assert writer.pending == {} and writer.async_copies == 0  # no CUDA: copies are synchronous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 5, BLOCK, 3 * BLOCK + 7, 2_000_003])
def test_sum_of_squares(dtype, n):
    t = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    want = t.double().pow(2).sum().item()
    got = sum_of_squares(t)
    assert got.dtype == torch.float32
    # an fp32 running sum over a row of BLOCK elements: error about sqrt(BLOCK) * 6e-8 = 4e-6
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-30)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"chunk_mb": 0.02, "device_budget_mb": 0.35},
        {"chunk_mb": 0.02, "overlap_step": "on", "device_budget_mb": 0.35},
    ],
    ids=["plain", "offload", "offload_overlapped"],
)
@pytest.mark.parametrize("micro", [1, 2])
def test_micro_batches_match_the_plain_model(one_thread, kw, micro):
    cfg = run_config()
    model = build_model(cfg)
    engine = apply_engine(model, Comm(), **kw)
    step = make_step(model, cfg, engine)
    chunks = engine.store.chunks
    after_backward = []
    clip = engine.clip_grad_norm_

    def clip_and_record(max_norm: float) -> torch.Tensor:  # runs right after the backward
        clean = [c.grad_clean for c in chunks]
        after_backward.append((clean, sorted(engine.store.grad_writer.squares)))
        return clip(max_norm)

    engine.clip_grad_norm_ = clip_and_record  # type: ignore[method-assign]
    assert all(c.grad_clean for c in chunks)
    losses, norms = [], []
    for s in range(STEPS):
        result = step(batches(s, micro))  # the first micro-batch copies, a second adds
        losses.append(result.loss)
        norms.append(result.grad_norm)
        engine.synchronize()  # overlapped updates zero their shards in the worker thread
        assert all(c.grad_clean for c in chunks)
    # one micro-batch: every chunk's sum of squares comes from its copy; two: from the shard
    squares = list(range(len(chunks))) if micro == 1 else []
    assert after_backward == [([False] * len(chunks), squares)] * STEPS
    ref_model = build_model(cfg)
    ref_step = make_step(ref_model, cfg, None)
    ref = [ref_step(batches(s, micro)) for s in range(STEPS)]
    assert losses == pytest.approx([r.loss for r in ref], rel=1e-5)
    assert norms == pytest.approx([r.grad_norm for r in ref], rel=1e-5)


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, use_b: bool = True) -> torch.Tensor:
        y = self.a(x)
        return self.b(y) if use_b else y


def test_bf16_gradient_shards_carry_the_parameters_between_steps():
    """With bf16 gradients and parameters the optimizer leaves the updated parameters in the
    gradient shards, and the next gathers read them there; a chunk that then gets no gradient
    must not step on its parameters: its gradient shard is zero after the backward."""
    torch.manual_seed(0)
    model = TwoLayers()
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    bf16 = {"param_dtype": "bfloat16", "reduce_dtype": "bfloat16"}
    engine = apply(
        model,
        EngineConfig(kind="myriad", chunk_mb=1e-4, **bf16),  # one chunk per weight
        comm=Comm(),
        device=torch.device("cpu"),
        run_forward=lambda: model(x.float()),  # traced before the parameters turn bf16
    )
    optimizer = engine.build_optimizer(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    chunk_b = engine.store.chunks_of([model.b.weight])[0]
    for use_b in (True, False):
        model(x, use_b).float().sum().backward()
        engine.finish_backward()
        engine.clip_grad_norm_(1e9)
        optimizer.step()
        optimizer.zero_grad()
        in_grad, grad_b = chunk_b.params_in_grad, chunk_b.grad_S.clone()
        assert in_grad and torch.equal(grad_b, chunk_b.shard_S.detach().to(torch.bfloat16))
        before = engine.store.counts["gathers_from_grad"]
        with torch.no_grad():  # the gathered parameters are the masters cast to bf16
            masters = engine.full_state_dict()
            want = TwoLayers().to(torch.bfloat16)
            want.load_state_dict({k: v.to(torch.bfloat16) for k, v in masters.items()})
            assert torch.equal(model(x), want(x))
        assert engine.store.counts["gathers_from_grad"] > before
    model(x, use_b=False).float().sum().backward()  # b gets no gradient this time
    engine.finish_backward()
    # (plain values: pytest's repr of a chunk would read its released buffers)
    in_grad, grad_b = chunk_b.params_in_grad, chunk_b.grad_S.tolist()
    assert not in_grad and not any(grad_b)
    assert engine.store.chunks_of([model.a.weight])[0].grad_S.any()
