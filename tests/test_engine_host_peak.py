"""The optimizer's Adam moments of host payloads are made in the payloads' homes: building the
optimizer raises the host's peak RAM by the moments' bytes once, not twice (a transient copy
beside the homes would cost 8 more bytes per parameter at the peak, which bounds the largest
model a machine trains)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from test_engine_support import apply_engine

from myriad.engine.comm import Comm
from myriad.model import ModelConfig, MoETransformerLM

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.skipif(not CLEAR_REFS.exists(), reason="needs Linux /proc peak-RSS reset")
def test_building_the_optimizer_adds_the_moments_to_peak_host_ram_once():
    cfg = ModelConfig(
        objective="clm", vocab_size=512, d_model=512, n_layers=4, n_heads=8, d_ff=1536,
        max_seq_len=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MoETransformerLM(cfg)
    engine = apply_engine(model, Comm(), chunk_mb=4.0, device_budget_mb=64.0)
    chunks = engine.store.chunks
    moment_bytes = sum(8 * c.shard_S.numel() for c in chunks)  # on the CPU: all host RAM
    assert moment_bytes > 64 * 2**20  # large enough to read against RSS noise
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)  # its lazy imports
    gc.collect()
    CLEAR_REFS.write_text("5")  # peak RSS := current RSS
    before = _kib("VmHWM")
    engine.build_optimizer(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    growth = (_kib("VmHWM") - before) * 1024
    assert moment_bytes * 0.95 < growth < moment_bytes * 1.1, (growth, moment_bytes)
    state = engine.optimizer.state
    for c in (c for c in chunks if c.index in engine.host_home):
        home = engine.host_home[c.index]
        assert state[c.shard_S]["exp_avg"].data_ptr() == home[2].data_ptr()
        assert state[c.shard_S]["exp_avg_sq"].data_ptr() == home[3].data_ptr()
