"""Which backend the process group gets, and where its collectives then take tensors."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from myriad.engine import comm


@pytest.fixture
def torchrun_env(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    joined = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: joined.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    return joined


@pytest.mark.parametrize(
    ("asked", "cuda", "joined"),
    [
        ("auto", True, "cpu:gloo,cuda:nccl"),  # FSDP2's CPU offload reduces over CPU shards
        ("nccl", True, "cpu:gloo,cuda:nccl"),
        ("auto", False, "gloo"),
        ("gloo", True, "gloo"),
    ],
)
def test_nccl_comes_with_gloo_for_cpu_tensors(torchrun_env, monkeypatch, asked, cuda, joined):
    monkeypatch.setattr(comm.torch.cuda, "is_available", lambda: cuda)
    group = comm.init_distributed(asked)
    assert torchrun_env == [joined] and group.world == 2


@pytest.mark.parametrize(
    ("backend", "device_type"),
    [("cpu:gloo,cuda:nccl", "cuda"), ("nccl", "cuda"), ("gloo", "cpu"), ("cpu:gloo", "cpu")],
)
def test_collective_device_follows_nccl(monkeypatch, backend, device_type):
    monkeypatch.setattr(dist, "get_backend", lambda: backend)
    assert comm.collective_device_type() == device_type
