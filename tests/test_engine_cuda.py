"""On a CUDA device: the engine with host offload (pinned memory, mixed-device AdamW) gives the
plain model's losses. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from test_engine_support import batches, build_model, run_config

from myriad.engine.comm import Comm
from myriad.engine.config import EngineConfig
from myriad.engine.engine import apply
from myriad.train.device import autocast_factory
from myriad.train.optim import build_optimizer, build_scheduler
from myriad.train.step import TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
STEPS = 4


def _losses(engine_cfg: EngineConfig | None) -> tuple[list[float], dict]:
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
    losses = [step(batches(s, 1)).loss for s in range(STEPS)]
    if engine is None:
        return losses, {}
    tiers = {c.shard_S.device.type for c in engine.store.chunks if c.shard_S is not None}
    pinned = all(
        c.shard_S.is_pinned() for c in engine.store.chunks if c.shard_S.device.type == "cpu"
    )
    return losses, {**engine.report(), "tiers": tiers, "pinned": pinned}


def test_cuda_offload_matches_plain_model():
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, _ = _losses(None)
    losses, report = _losses(EngineConfig(kind="myriad", chunk_mb=0.02, device_budget_mb=0.5))
    assert losses == pytest.approx(ref, rel=1e-5)
    assert 0 < report["peak_device_bytes"] <= report["budget_bytes"]
    assert report["evictions"] > 0
    assert report["tiers"] == {"cpu", "cuda"} and report["pinned"]
