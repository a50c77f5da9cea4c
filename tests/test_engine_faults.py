"""Expert parallelism with empty ranks and experts, and a dead rank (2 gloo ranks each).

In float64, so the comparison checks the algorithm and not rounding order. Experts with no
tokens, and a rank that receives no rows at all, must still take part in every
exchange (forward and backward) and give the dense reference's outputs and gradients. A rank
that dies makes the survivor raise ``PeerLostError`` naming the collective, within the timeout.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from test_engine_support import (
    apply_engine,
    batches,
    build_model,
    free_port,
    init_rank,
    run_config,
    spawn,
)

from myriad.engine.comm import PeerLostError
from myriad.engine.expert import ExpertParallel

E, D, FF, T, K = 4, 8, 6, 5, 2


def _data(rank: int):
    gen = torch.Generator().manual_seed(rank)
    x_TD = torch.randn(T, D, generator=gen, dtype=torch.float64)
    # Rank 0's tokens pick experts 0 and 1, rank 1's 1 and 0: experts 2, 3 (rank 1's) get none.
    ids_TK = torch.tensor([[0, 1]] * T) if rank == 0 else torch.tensor([[1, 0]] * T)
    w_TK = torch.rand(T, K, generator=gen, dtype=torch.float64)
    return x_TD, ids_TK, w_TK


def _reference(x_TD, ids_TK, w_TK, w_in, w_out):
    """Loop over assignments with the full expert weights."""
    y_TD = torch.zeros_like(x_TD)
    for t in range(T):
        for k in range(K):
            e = int(ids_TK[t, k])
            gate, up = (x_TD[t] @ w_in[e]).chunk(2)
            y_TD[t] += w_TK[t, k] * ((F.silu(gate) * up) @ w_out[e])
    return y_TD


def _ep_worker(rank: int, world: int, port: int, out: str) -> None:
    comm = init_rank(rank, world, port)
    gen = torch.Generator().manual_seed(42)
    w_in = torch.randn(E, D, 2 * FF, generator=gen, dtype=torch.float64)
    w_out = torch.randn(E, FF, D, generator=gen, dtype=torch.float64)
    per = E // world
    mine = slice(rank * per, (rank + 1) * per)
    local_in = w_in[mine].clone().requires_grad_()
    local_out = w_out[mine].clone().requires_grad_()
    x_TD, ids_TK, w_TK = _data(rank)
    x_TD.requires_grad_()
    y_TD = ExpertParallel(comm, E)(x_TD, ids_TK, w_TK, local_in, local_out)
    y_TD.pow(2).sum().backward()

    ref_in, ref_out = w_in.clone().requires_grad_(), w_out.clone().requires_grad_()
    total = 0
    for r in range(world):  # the loss of every rank, for the expert weights' gradients
        xr, idr, wr = _data(r)
        xr.requires_grad_(r == rank)
        yr = _reference(xr, idr, wr, ref_in, ref_out)
        total = total + yr.pow(2).sum()
        if r == rank:
            x_ref, y_ref = xr, yr
    total.backward()
    torch.testing.assert_close(y_TD, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_TD.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    for local, ref in ((local_in, ref_in), (local_out, ref_out)):
        # No rows here (rank 1): no gradient, which the engine reads as zero.
        grad = local.grad if local.grad is not None else torch.zeros_like(local)
        assert ref.grad is not None
        torch.testing.assert_close(grad, ref.grad[mine], rtol=1e-10, atol=1e-10)
    Path(out, f"ok{rank}").write_text("ok")


def test_expert_parallel_with_empty_experts_and_an_empty_rank(tmp_path):
    spawn(_ep_worker, 2, str(tmp_path))
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def _dead_worker(rank: int, world: int, port: int, out: str, timeout_s: float) -> None:
    comm = init_rank(rank, world, port, timeout_s=timeout_s)
    cfg = run_config()
    model = build_model(cfg)
    apply_engine(model, comm, chunk_mb=0.02, timeout_s=timeout_s)
    if rank == 1:
        os._exit(3)  # dies without a word, as a killed process does
    start = time.monotonic()
    try:
        b = batches(0, world)[rank]
        model(b["input_ids"], b["labels"]).loss.backward()
        message = "no error"
    except PeerLostError as exc:
        message = str(exc)
    Path(out, "rank0.txt").write_text(f"{time.monotonic() - start:.3f}\n{message}")


def test_dead_rank_gives_clear_error_within_timeout(tmp_path):
    timeout_s = 10.0
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_dead_worker, args=(r, 2, port, str(tmp_path), timeout_s))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert procs[1].exitcode == 3
    elapsed, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert "failed on rank 0 of 2" in message and "engine.timeout_s" in message
    assert float(elapsed) < timeout_s + 5
