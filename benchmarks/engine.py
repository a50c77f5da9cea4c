"""Training-engine modes side by side: correctness, step time, host memory per parameter.

CPU (default): a small MoE LM trained for a few fp32 steps in each mode, each mode in fresh
processes (2 gloo ranks where it says so) so every RSS is its own:

* ``none``: the plain model and torch's fused AdamW (the reference losses);
* ``myriad``: Myriad's chunked engine in one process; ``myriad-offload``: the same under a small
  device budget (evicts every step); ``myriad-2r``: 2 ranks; ``myriad-2r-ep``: 2 ranks with
  expert parallelism and offload;
* ``fsdp2-2r`` / ``fsdp2-2r-offload``: PyTorch FSDP2 on 2 ranks (when ``myriad.engine.fsdp2``
  exists), without / with ``CPUOffloadPolicy``.

It prints a markdown table: max relative loss difference to ``none`` (2-rank modes are compared
with the reference that takes both ranks' batches as micro-batches), median step time, peak
RSS growth per parameter over the process's baseline, and the engine's peak managed device
bytes. Then it measures the optimizer: params/s of the engine's shard AdamW vs torch's fused CPU
AdamW on the same number of parameters.

GPU (``--gpu``, not yet run by us): the issue's 2.8 B dense Llama-like model (hidden 3072, 26
layers, FFN 8192, 24 heads, 8 KV heads, vocab 32000, batch 4 x 2048, bf16 autocast) in one
process: ``none`` (all on the GPU), ``myriad-offload`` (under ``--budget-gb``) and
``fsdp2-offload``; step time, TFLOP/s (6 x parameters x tokens / step), peak GPU memory, host RSS
per parameter. DeepSpeed and the MoE twin are not in it yet.

Run:  python benchmarks/engine.py [--steps 6] [--d-model 256] [--layers 4]
      python benchmarks/engine.py --gpu [--steps 4] [--budget-gb 24]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from myriad.engine.comm import Comm
from myriad.engine.config import EngineConfig
from myriad.model import ModelConfig, MoEConfig, MoETransformerLM
from myriad.train.config import TrainConfig
from myriad.train.device import autocast_factory
from myriad.train.optim import build_optimizer, build_scheduler
from myriad.train.step import TrainStep

CPU = torch.device("cpu")
SEQ, BATCH = 64, 4
MODES: dict[str, tuple[int, dict[str, Any]]] = {
    "none": (1, {}),
    "myriad": (1, {"kind": "myriad", "chunk_mb": 4.0}),
    "myriad-offload": (1, {"kind": "myriad", "chunk_mb": 4.0, "device_budget_mb": 120.0}),
    "myriad-2r": (2, {"kind": "myriad", "chunk_mb": 4.0}),
    "myriad-2r-ep": (
        2,
        {"kind": "myriad", "chunk_mb": 4.0, "device_budget_mb": 100.0, "expert_parallel": True},
    ),
    "fsdp2-2r": (2, {"kind": "fsdp2"}),
    "fsdp2-2r-offload": (2, {"kind": "fsdp2", "cpu_offload": True}),
}
GPU_MODES: dict[str, tuple[int, dict[str, Any]]] = {
    "none": (1, {}),
    "myriad-offload": (1, {"kind": "myriad", "chunk_mb": 256.0}),  # budget from --budget-gb
    "fsdp2-offload": (1, {"kind": "fsdp2", "cpu_offload": True}),
}


def gpu_model_config() -> ModelConfig:
    """The issue's 2.8 B dense Llama-like model."""
    return ModelConfig(
        objective="clm",
        vocab_size=32000,
        d_model=3072,
        n_layers=26,
        n_heads=24,
        n_kv_heads=8,
        d_ff=8192,
        max_seq_len=2048,
        moe=MoEConfig(every=0),
    )


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        objective="clm",
        vocab_size=4000,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=4,
        d_ff=4 * args.d_model,
        max_seq_len=SEQ,
        moe=MoEConfig(num_experts=8, top_k=2, d_expert=2 * args.d_model, every=2),
    )


def batch(index: int, vocab: int, shape: tuple[int, int] = (BATCH, SEQ)) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(index)
    ids = torch.randint(0, vocab, shape, generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process (Linux); getrusage's
    peak would include the parent's, which survives the spawn's exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _build(
    rank: int,
    world: int,
    kind_kw: dict,
    mcfg: ModelConfig,
    train: TrainConfig,
    device: torch.device = CPU,
):
    torch.manual_seed(0)
    model = MoETransformerLM(mcfg).to(device)
    kind = kind_kw.get("kind", "none")
    if kind == "myriad":
        from myriad.engine.engine import apply

        comm = Comm(rank, world, None, 600.0)
        probe = torch.zeros(1, 4, dtype=torch.long, device=device)
        cfg = EngineConfig(**kind_kw)
        engine = apply(model, cfg, comm=comm, device=device, run_forward=lambda: model(probe))
        betas = (train.beta1, train.beta2)
        opt = engine.build_optimizer(
            lr=train.lr, betas=betas, eps=train.eps, weight_decay=train.weight_decay
        )
        return model, opt, engine, engine
    if kind == "fsdp2":
        from myriad.engine import fsdp2
        from myriad.engine.runtime import FSDP2Sync

        offload = kind_kw.get("cpu_offload", False)
        fsdp2.apply_fsdp2(model, fsdp2.build_mesh(), cpu_offload=offload)
        opt = build_optimizer(model, train, CPU if offload else device)
        return model, opt, FSDP2Sync(Comm(rank, world), model), None
    return model, build_optimizer(model, train, device), None, None


def worker(rank: int, world: int, port: int, name: str, args: argparse.Namespace, out: str):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    device = torch.device("cuda") if args.gpu else CPU
    kind_kw = dict((GPU_MODES if args.gpu else MODES)[name][1])
    if args.gpu and kind_kw.get("kind") == "myriad":
        kind_kw["device_budget_mb"] = args.budget_gb * 1024
    if world > 1 or kind_kw.get("kind") == "fsdp2":
        backend = "nccl" if args.gpu else "gloo"
        init = f"tcp://127.0.0.1:{port}"
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    base = rss_bytes()
    mcfg = gpu_model_config() if args.gpu else model_config(args)
    shape = (4, 2048) if args.gpu else (BATCH, SEQ)
    train = TrainConfig(steps=args.steps, batch_size=shape[0], lr=1e-3, warmup_steps=1)
    model, opt, sync, engine = _build(rank, world, kind_kw, mcfg, train, device)
    step_fn = TrainStep(
        model,
        opt,
        build_scheduler(opt, train),
        grad_clip=1.0,
        autocast=autocast_factory("bf16" if args.gpu else "fp32", device),
        device=device,
        sync=sync,
    )
    losses, times = [], []
    for s in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step_fn([batch(s * world + rank, mcfg.vocab_size, shape)]).loss)
        if args.gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in MoETransformerLM(mcfg).parameters())
    report = engine.report() if engine is not None else {}
    step_s = statistics.median(times[1:] or times)
    result = {
        "losses": losses,
        "step_s": step_s,
        "tflops": 6 * params * shape[0] * shape[1] / step_s / 1e12,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if args.gpu else None,
        "rss_per_param": (rss_bytes("VmHWM") - base) / params,
        "params": params,
        "peak_device_mb": report.get("peak_device_mb"),
        "evictions": report.get("evictions"),
    }
    torch.save(result, Path(out) / f"{name}-{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


def reference(args: argparse.Namespace, world: int) -> list[float]:
    """Single process, both ranks' batches as micro-batches (what data parallelism computes)."""
    mcfg = model_config(args)
    train = TrainConfig(steps=args.steps, batch_size=BATCH, lr=1e-3, warmup_steps=1, device="cpu")
    model, opt, _, _ = _build(0, 1, {}, mcfg, train)
    step_fn = TrainStep(
        model,
        opt,
        build_scheduler(opt, train),
        grad_clip=1.0,
        autocast=autocast_factory("fp32", CPU),
        device=CPU,
    )
    return [
        step_fn([batch(s * world + r, mcfg.vocab_size) for r in range(world)]).loss
        for s in range(args.steps)
    ]


def adam_rate(numel: int, repeats: int = 5) -> tuple[float, float]:
    """params/s of the engine's shard AdamW (host-resident payloads) vs torch fused CPU AdamW."""
    from myriad.engine.optim import ShardAdamW, shard_param

    def timed(opt: torch.optim.Optimizer) -> float:
        opt.step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            opt.step()
        return numel * repeats / (time.perf_counter() - t0)

    shard = shard_param(torch.randn(numel))
    assert shard.grad is not None
    shard.grad.normal_()
    mine = ShardAdamW(
        [{"params": [shard], "weight_decay": 0.01}],
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        before_step=lambda: None,
        after_step=lambda: None,
    )
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    ref = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    return timed(mine), timed(ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--modes", nargs="*", help="default: every mode of the chosen table")
    parser.add_argument("--gpu", action="store_true", help="the 2.8 B dense model on one GPU")
    parser.add_argument("--budget-gb", type=float, default=24.0, help="GPU: engine budget")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    table = GPU_MODES if args.gpu else MODES
    modes = args.modes or list(table)
    try:
        import myriad.engine.fsdp2  # noqa: F401
    except ImportError:
        modes = [m for m in modes if not m.startswith("fsdp2")]
    refs = {} if args.gpu else {w: reference(args, w) for w in (1, 2)}
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name in modes:
            world = table[name][0]
            mp.spawn(worker, args=(world, _free_port(), name, args, out), nprocs=world, join=True)
            r = [torch.load(Path(out) / f"{name}-{i}.pt") for i in range(world)]
            # GPU: compared with the first mode's losses (bf16: a sanity check, not exactness).
            ref = refs[world] if refs else (rows[0][3] if rows else r[0])["losses"]
            diff = max(abs(a - b) / abs(b) for a, b in zip(r[0]["losses"], ref, strict=True))
            rows.append((name, world, diff, r[0], sum(x["rss_per_param"] for x in r) / world))
    _print_table(args, rows)
    if not args.gpu:
        mine, ref_rate = adam_rate(8_000_000)
        print(
            f"\nAdamW on 8 M fp32 params, {torch.get_num_threads()} threads: engine shard AdamW "
            f"{mine / 1e9:.2f} G params/s, torch fused CPU AdamW {ref_rate / 1e9:.2f} G params/s"
        )


def _print_table(args: argparse.Namespace, rows: list) -> None:
    params = rows[0][3]["params"]
    where = torch.cuda.get_device_name() if args.gpu else f"CPU, {os.cpu_count()} cores"
    print(f"\n{params:,} parameters, {args.steps} steps, {where}\n")
    print(
        "| mode | ranks | max rel. loss diff | step s | TFLOP/s | peak GPU GB |"
        " RSS growth B/param (per rank) | peak managed device MB | evictions |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, world, diff, r, rss in rows:
        peak = "" if r["peak_device_mb"] is None else f"{r['peak_device_mb']:.1f}"
        ev = "" if r["evictions"] is None else str(r["evictions"])
        gpu = "" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.1f}"
        print(
            f"| {name} | {world} | {diff:.1e} | {r['step_s']:.3f} | {r['tflops']:.3f} | {gpu} "
            f"| {rss:.1f} | {peak} | {ev} |"
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
