"""On a CUDA device: the engine with host offload (pinned memory, mixed-device AdamW), non-model
memory traced by the allocator probe, payloads prefetched on a side stream (dynamic placement)
or fixed after the warm-up (static, the default there), gathers started ahead on another,
gradient shards copied to the host without a wait (with gradient accumulation too),
and the host payloads' optimizer step overlapped with the next forward gives the plain model's
losses, and the device's real peak after the warm-up stays under the budget. Skipped without
CUDA."""

from __future__ import annotations

import dataclasses
import gc
import math

import pytest
import torch
from test_engine_support import batches, build_model, run_config

from myriad.engine.comm import Comm
from myriad.engine.config import EngineConfig
from myriad.engine.engine import apply
from myriad.engine.placement import MARGIN, MARGIN_FLOOR, MB
from myriad.train.device import autocast_factory
from myriad.train.optim import build_optimizer, build_scheduler
from myriad.train.step import TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
STEPS = 4
CHUNK_MB = 0.02
ROOM_MB = 0.5  # managed bytes beyond the traced non-model memory: evicts every step


def _losses(engine_cfg: EngineConfig | None, micro: int = 1) -> tuple[list[float], dict]:
    """Losses of STEPS steps; with the engine also its report, the payload tiers, and the
    allocator's peak over the steps after the warm-up."""
    gc.collect()  # earlier runs' tensors must not count as this run's non-model memory
    torch.cuda.empty_cache()
    dev = torch.device("cuda")
    cfg = run_config()
    model = build_model(cfg).to(dev)
    t = cfg.train
    engine = None
    if engine_cfg is None:
        optimizer = build_optimizer(model, t, dev)
    else:
        ids = torch.zeros(1, 4, dtype=torch.long, device=dev)
        engine = apply(model, engine_cfg, comm=Comm(), device=dev, run_forward=lambda: model(ids))
        betas = (t.beta1, t.beta2)
        optimizer = engine.build_optimizer(
            lr=t.lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay
        )
    step = TrainStep(
        model,
        optimizer,
        build_scheduler(optimizer, t),
        grad_clip=t.grad_clip,
        autocast=autocast_factory("fp32", dev),
        device=dev,
        sync=engine,
    )
    losses = [step(batches(0, micro)).loss]  # the warm-up (the probe resets the peak statistic)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses += [step(batches(s, micro)).loss for s in range(1, STEPS)]
    torch.cuda.synchronize()
    if engine is None:
        return losses, {}
    chunks = engine.store.chunks
    tiers = {c.shard_S.device.type for c in chunks if c.shard_S is not None}
    pinned = all(c.shard_S.is_pinned() for c in chunks if c.shard_S.device.type == "cpu")
    peak = torch.cuda.max_memory_allocated()
    return losses, {**engine.report(), "tiers": tiers, "pinned": pinned, "device_peak": peak}


def test_cuda_offload_prefetch_matches_plain_model_under_budget():
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, _ = _losses(None)
    # Runs with room to spare measure the step's non-model memory (activations, the BLAS
    # workspaces, ...); the budget is that, with the manager's margin, plus ROOM_MB. The first
    # H200 run found the reading 0.42 MB higher in the run after the probe: two probes in a row
    # must agree (memory left behind by a finished run would show here).
    roomy = EngineConfig(kind="myriad", chunk_mb=CHUNK_MB, device_budget_mb=4096)
    probes = [_losses(roomy)[1] for _ in range(2)]
    nonmodel = probes[1]["nonmodel_peak_bytes"]
    assert nonmodel > 0 and all(p["evictions"] == 0 for p in probes)
    assert nonmodel == probes[0]["nonmodel_peak_bytes"]
    margin = max(math.ceil(nonmodel * MARGIN), MARGIN_FLOOR)
    budget_mb = (nonmodel + margin + ROOM_MB * MB) / MB
    cfg = EngineConfig(
        kind="myriad", chunk_mb=CHUNK_MB, device_budget_mb=budget_mb, placement="dynamic"
    )
    losses, report = _losses(cfg)
    assert losses == pytest.approx(ref, rel=1e-5)
    assert 0 < report["peak_device_bytes"] <= report["budget_bytes"]
    assert report["device_peak"] <= report["budget_bytes"]  # everything, not only managed
    assert report["evictions"] > 0 and report["prefetch_hits"] > 0
    assert report["tiers"] == {"cpu", "cuda"} and report["pinned"]
    # auto on CUDA: host payloads' Adam overlaps the next forward, with the serial step's result
    assert report["overlapped_updates"] > 0
    serial, _ = _losses(dataclasses.replace(cfg, overlap_step="off"))
    assert losses == serial
    # the next chunk's gather (host shard staged, then copied) runs on its own stream ahead
    assert report["gather_ahead"] == 1 and report["gathers_ahead"] > 0
    on_demand, _ = _losses(dataclasses.replace(cfg, gather_ahead=0))
    assert losses == on_demand
    # host gradient shards receive their first gradient by an asynchronous copy, then adds
    assert report["async_grad_copies"] > 0
    # the CUDA default: payloads fixed after the warm-up, the others served from the host (not
    # bit for bit: other shards are stepped by the CPU's AdamW kernel than above)
    static, static_report = _losses(dataclasses.replace(cfg, placement="auto"))
    assert static == pytest.approx(ref, rel=1e-5) and static_report["placement"] == "static"
    assert static_report["device_peak"] <= static_report["budget_bytes"]
    assert static_report["host_accesses"] > 0 and static_report["prefetch_loads"] == 0
    two, two_report = _losses(cfg, micro=2)
    assert two == pytest.approx(_losses(None, micro=2)[0], rel=1e-5)
    assert two_report["async_grad_copies"] > 0


def test_a_refused_host_registration_does_not_fail_the_next_kernel():
    """Registering pages twice fails (already registered); once hostmem clears the runtime's
    last error, PyTorch's next kernel launch check passes."""
    import mmap

    from myriad.engine import hostmem

    torch.ones(1, device="cuda")  # the runtime is loaded and initialised
    assert hostmem._loaded_cudart() is not None
    cudart = torch.cuda.cudart()
    pages = torch.frombuffer(mmap.mmap(-1, 1 << 20), dtype=torch.uint8)
    assert int(cudart.cudaHostRegister(pages.data_ptr(), pages.numel(), 1)) == 0
    try:
        assert int(cudart.cudaHostRegister(pages.data_ptr(), pages.numel(), 1)) != 0
        hostmem._clear_cuda_error()
        assert (torch.ones(4, device="cuda") + 1).sum().item() == 8.0
    finally:
        cudart.cudaHostUnregister(pages.data_ptr())
