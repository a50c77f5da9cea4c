"""FSDP2 on 2 gloo ranks (spawned here, CPU) vs the single-process run: same losses and weights.

The reference accumulates the two ranks' micro-batches in one process (``accumulate_gradients``),
which is exactly the data-parallel step: each micro-batch loss is a mean over the same number of
targets, so averaging the ranks' gradients equals the accumulated gradient.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from test_engine_support import spawn

from myriad.model import MoETransformerLM
from myriad.model.config import ModelConfig, MoEConfig
from myriad.train.step import accumulate_gradients

WORLD, STEPS, MAX_NORM = 2, 4, 0.5
MODES = ("sharded", "cpu-offload", "expert-parallel", "expert-parallel+cpu-offload")


def config() -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=32, every=2, bias_update_rate=0.01)
    return ModelConfig(
        objective="clm", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
        d_ff=64, max_seq_len=16, moe=moe,
    )  # fmt: skip


def micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
    """One micro-batch of 2 sequences per rank; rank r takes element r. The same every step
    (``step`` unused) so that the loss visibly falls."""
    g = torch.Generator().manual_seed(100)
    ids = torch.randint(0, 96, (WORLD, 2, 16), generator=g)
    return [{"input_ids": ids[r], "labels": ids[r]} for r in range(WORLD)]


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, foreach=True)


def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = MoETransformerLM(config())
    opt = optimizer(model)
    losses = []
    for step in range(STEPS):
        acc = accumulate_gradients(model, micro_batches(step), _no_autocast, torch.device("cpu"))
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases(acc.tokens_per_expert)
        losses.append(acc.loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Train ``STEPS`` steps in every mode of ``MODES``; rank 0 saves the results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {mode: train_sharded(rank, mode) for mode in MODES}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "r0.pt"))
    finally:
        dist.destroy_process_group()


def train_sharded(rank: int, mode: str) -> dict:
    """``expert-parallel``: each rank keeps 2 of the 4 experts (all-to-all over both ranks)."""
    from myriad.engine import fsdp2_experts
    from myriad.engine.comm import Comm
    from myriad.engine.fsdp2 import (
        all_reduce_expert_loads,
        apply_fsdp2,
        build_mesh,
        clip_grad_norm_,
        full_state_dict,
    )
    from myriad.engine.runtime import install_dtensor_state_dict_hooks

    torch.manual_seed(0)  # every rank builds the same initial weights, as the trainer does
    model = MoETransformerLM(config())
    experts = None
    if mode.startswith("expert-parallel"):
        experts = fsdp2_experts.split(model, Comm(rank, WORLD), 0)
        assert experts is not None and len(experts.rows) == 2  # 1 MoE layer x 2 weights
    expert_mesh = experts.edp_mesh if experts else None
    cpu_offload = mode.endswith("cpu-offload")
    model = apply_fsdp2(model, build_mesh(), cpu_offload=cpu_offload, expert_mesh=expert_mesh)
    if experts is not None:
        local = dict(model.named_parameters())[next(iter(experts.rows))]
        assert local.shape[0] == 2 and local.to_local().shape[0] == 2  # E/k rows, EDP of 1
        install_dtensor_state_dict_hooks(model, experts)
    opt = optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for step in range(STEPS):
        batch = micro_batches(step)[rank]
        out = model(batch["input_ids"], batch["labels"])
        out.loss.backward()
        clip_grad_norm_(params, MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases(all_reduce_expert_loads(out.tokens_per_expert))
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / WORLD)
    weights = full_state_dict(model) if experts is None else model.state_dict()
    return {"losses": losses, "weights": weights}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process reference, and every FSDP2 mode from one spawn of 2 gloo ranks."""
    out_dir = tmp_path_factory.mktemp("fsdp2")
    spawn(worker, WORLD, str(out_dir))
    return reference(), torch.load(out_dir / "r0.pt")


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_two_ranks_match_single_process(runs, mode):
    (ref_losses, ref_weights), sharded = runs
    got = sharded[mode]
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert ref_losses[-1] < 0.9 * ref_losses[0]  # it trains
    assert set(got["weights"]) == set(ref_weights)
    for name, ref in ref_weights.items():
        # Relative to the tensor's norm: Adam divides by sqrt(v), so an element whose gradient
        # is ~0 turns float-rounding differences in the sum into visible element-wise ones.
        error = (got["weights"][name] - ref).norm() / ref.norm()
        assert error < 1e-5, (name, error.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp2_cpu_offload_on_cuda_matches_plain_training(tmp_path):
    """One NCCL rank: pinned-memory offload, CPU optimizer step, same losses as the GPU model."""
    from myriad.engine.fsdp2 import apply_fsdp2, build_mesh

    batch = micro_batches(0)[0]
    ids_BS = batch["input_ids"].cuda()

    def train(model: MoETransformerLM) -> list[float]:
        opt = optimizer(model)
        losses = []
        for _ in range(STEPS):
            loss = model(ids_BS, ids_BS).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    torch.manual_seed(0)
    plain = train(MoETransformerLM(config()).cuda())
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = apply_fsdp2(MoETransformerLM(config()).cuda(), build_mesh(), cpu_offload=True)
        assert next(model.parameters()).device.type == "cpu"  # sharded states live on the host
        offloaded = train(model)
    finally:
        dist.destroy_process_group()
    assert offloaded == pytest.approx(plain, rel=1e-5)
