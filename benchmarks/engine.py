"""Training-engine modes side by side: correctness, step time, host memory per parameter.

CPU (default): a small MoE LM trained for a few steps in each mode, each mode in fresh processes
(2 gloo ranks where it says so) so every RSS is its own:

* ``none``: the plain model and torch's fused AdamW (the reference losses);
* ``myriad``: Myriad's chunked engine in one process; ``myriad-offload``: the same under a small
  device budget (evicts every step), ``-overlap`` with ``engine.overlap_step = "on"``,
  ``-static`` with ``engine.placement = "static"`` (payloads fixed after the warm-up);
  ``myriad-2r``: 2 ranks (``-ondemand``: ``engine.gather_ahead = 0``, no all-gather started
  while the previous chunk computes); ``myriad-2r-ep``: 2 ranks with expert parallelism and offload;
  ``-bf16``: ``engine.param_dtype = reduce_dtype = bfloat16`` (bf16 gathered parameters and
  gradient shards, fp32 masters and moments);
* ``fsdp2-2r`` / ``fsdp2-2r-offload`` / ``fsdp2-2r-bf16``: PyTorch FSDP2 on 2 ranks, without /
  with ``CPUOffloadPolicy`` / with ``MixedPrecisionPolicy(bf16, bf16)``.

It prints a markdown table: max relative loss difference to the fp32 reference (2-rank modes
against the reference that takes both ranks' batches as micro-batches; bf16 modes show their
rounding, not an error), median step time, peak RSS growth per parameter over the process's
baseline, the engine's own accounted host bytes per parameter (payload homes, plus on a CPU the
device tier it manages: payloads and gathered chunks), and its peak managed device bytes. The
baseline is taken after a warm-up that loads what every mode loads lazily (optimizer and kernel
modules, ~70 MB here), so the growth is what the model's states cost. Then it measures the
optimizer: params/s of the engine's shard AdamW vs torch's fused CPU AdamW.

GPU (``--gpu``): the issue's 2.8 B dense Llama-like model (hidden 3072, 26 layers, FFN 8192, 24
heads, 8 KV heads, vocab 32000, batch 4 x 2048, bf16 autocast), or with ``--model moe`` its MoE
twin of similar total size (every 2nd FFN is 8 experts of width 1024, top-2), built directly on
the GPU, in one process: ``none`` (all on the GPU), ``myriad-offload`` (under ``--budget-gb``),
``myriad-offload-bf16`` (bf16 parameters, fp32 masters; ``-serial``: without
``engine.overlap_step``; ``-ondemand``: without ``engine.gather_ahead``; ``-dynamic``: payloads
moved in and out every step instead of fixed after the warm-up) and ``fsdp2-offload``
(``-bf16``); step time, TFLOP/s (6 x active parameters x tokens / step), peak GPU memory over
the steps, host RSS per parameter, and for the offload modes the largest model host RAM holds at
that RSS per parameter (extrapolated). ``--json PATH`` also writes the rows. When DeepSpeed is
installed, its ZeRO-2 and ZeRO-3 CPU-offload rows run in the same table
(``benchmarks/engine_deepspeed.py``).
``--recompute`` turns on activation checkpointing in every mode (DeepSpeed's too) and
``--gpu-layers N`` scales the GPU model's depth: ``gpu_engine.sh OUT largest`` uses both to
find the largest model that trains under a 24 GB budget. ``benchmarks/gpu_engine.sh`` runs all
of it in GPU sessions.

Run:  python benchmarks/engine.py [--steps 4] [--d-model 256] [--layers 4] [--modes ...]
      python benchmarks/engine.py --gpu [--model dense|moe] [--steps 4] [--budget-gb 31]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
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
from myriad.model.params import count_parameters
from myriad.train.config import TrainConfig
from myriad.train.device import autocast_factory
from myriad.train.optim import build_optimizer, build_scheduler
from myriad.train.step import TrainStep

CPU = torch.device("cpu")
SEQ, BATCH = 64, 4
BF16 = {"param_dtype": "bfloat16", "reduce_dtype": "bfloat16"}
MYRIAD = {"kind": "myriad", "chunk_mb": 4.0}
EP_OFFLOAD = {**MYRIAD, "device_budget_mb": 100.0, "expert_parallel": True}
MODES: dict[str, tuple[int, dict[str, Any]]] = {
    "none": (1, {}),
    "myriad": (1, MYRIAD),
    "myriad-offload": (1, {**MYRIAD, "device_budget_mb": 120.0}),
    # the host payloads' AdamW in a thread during the next forward (off by default on a CPU)
    "myriad-offload-overlap": (1, {**MYRIAD, "device_budget_mb": 120.0, "overlap_step": "on"}),
    # payloads fixed after the warm-up (the CUDA default), the rest served from the host
    "myriad-offload-static": (1, {**MYRIAD, "device_budget_mb": 120.0, "placement": "static"}),
    "myriad-2r": (2, MYRIAD),
    "myriad-2r-ondemand": (2, {**MYRIAD, "gather_ahead": 0}),  # no all-gather started ahead
    "myriad-2r-ep": (2, EP_OFFLOAD),
    "myriad-2r-bf16": (2, {**MYRIAD, **BF16}),
    "myriad-2r-ep-bf16": (2, {**EP_OFFLOAD, **BF16, "device_budget_mb": 80.0}),
    "fsdp2-2r": (2, {"kind": "fsdp2"}),
    "fsdp2-2r-offload": (2, {"kind": "fsdp2", "cpu_offload": True}),
    "fsdp2-2r-bf16": (2, {"kind": "fsdp2", **BF16}),
}
GPU_MYRIAD = {"kind": "myriad", "chunk_mb": 256.0}  # budget from --budget-gb
GPU_MODES: dict[str, tuple[int, dict[str, Any]]] = {
    "none": (1, {}),
    "myriad-offload": (1, GPU_MYRIAD),
    "myriad-offload-bf16": (1, {**GPU_MYRIAD, **BF16}),
    # the optimizer step of host payloads not overlapped with the next forward (auto: it is)
    "myriad-offload-bf16-serial": (1, {**GPU_MYRIAD, **BF16, "overlap_step": "off"}),
    # each chunk's host shard staged and copied when its module runs, not ahead on a side stream
    "myriad-offload-bf16-ondemand": (1, {**GPU_MYRIAD, **BF16, "gather_ahead": 0}),
    # payloads moved in and out as the trace says (Belady), not fixed after the warm-up
    "myriad-offload-bf16-dynamic": (1, {**GPU_MYRIAD, **BF16, "placement": "dynamic"}),
    "fsdp2-offload": (1, {"kind": "fsdp2", "cpu_offload": True}),
    "fsdp2-offload-bf16": (1, {"kind": "fsdp2", "cpu_offload": True, **BF16}),
    "deepspeed-zero2-offload": (1, {"stage": 2}),  # benchmarks/engine_deepspeed.py, if installed
    "deepspeed-zero3-offload": (1, {"stage": 3}),
}


def gpu_model_config(kind: str = "dense", layers: int = 26) -> ModelConfig:
    """The issue's 2.8 B dense Llama-like model, or (``moe``) its MoE twin of similar total
    size: every 2nd FFN is 8 experts of width 1024 (top-2), 2.7 B parameters in all. ``layers``
    other than 26 scales the model (the largest one a budget trains)."""
    moe = (
        MoEConfig(every=0)
        if kind == "dense"
        else MoEConfig(num_experts=8, top_k=2, d_expert=1024, every=2)
    )
    return ModelConfig(
        objective="clm",
        vocab_size=32000,
        d_model=3072,
        n_layers=layers,
        n_heads=24,
        n_kv_heads=8,
        d_ff=8192,
        max_seq_len=2048,
        moe=moe,
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
    recompute: bool = False,
):
    """The mode's model, optimizer, ``GradSync`` and engine; the model is built on ``device``
    directly (no full host copy first), the same for every mode (``recompute``: activation
    checkpointing)."""
    torch.manual_seed(0)
    with device:
        model = MoETransformerLM(mcfg)
    model.checkpoint_blocks = recompute
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
        from myriad.engine.precision import fsdp2_dtypes
        from myriad.engine.runtime import FSDP2Sync

        cfg = EngineConfig(**kind_kw)
        offload = cfg.cpu_offload
        param_dtype, reduce_dtype = fsdp2_dtypes(cfg.param_dtype, cfg.reduce_dtype)
        fsdp2.apply_fsdp2(
            model,
            fsdp2.build_mesh(),
            cpu_offload=offload,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
        )
        opt = build_optimizer(model, train, CPU if offload else device)
        return model, opt, FSDP2Sync(Comm(rank, world), model), None
    return model, build_optimizer(model, train, device), None, None


def warm_up(device: torch.device) -> None:
    """Load what every mode loads lazily on first use (optimizer modules, kernels), so the
    RSS baseline holds it: ~70 MB that does not grow with the model."""
    tiny = ModelConfig(
        objective="clm", vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
        max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2, d_expert=32, every=2),
    )  # fmt: skip
    with device:
        model = MoETransformerLM(tiny)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    ids = torch.zeros(2, 16, dtype=torch.long, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model(ids, ids).loss.backward()
    opt.step()


def host_bytes(engine: Any, device: torch.device) -> int:
    """The engine's own account of its host memory: payload homes, plus on a CPU the device
    tier it manages (resident payloads, gathered chunks, gradient buffers), at its peak."""
    homes = sum(t.numel() * t.element_size() for h in engine.host_home.values() for t in h)
    tier = engine.report()["peak_device_bytes"] if device.type == "cpu" else 0
    return int(homes + tier)


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
    warm_up(device)
    base = rss_bytes()
    mcfg = gpu_model_config(args.model, args.gpu_layers) if args.gpu else model_config(args)
    counts = count_parameters(mcfg)
    shape = (4, 2048) if args.gpu else (BATCH, SEQ)
    train = TrainConfig(steps=args.steps, batch_size=shape[0], lr=1e-3, warmup_steps=1)
    model, opt, sync, engine = _build(rank, world, kind_kw, mcfg, train, device, args.recompute)
    step_fn = TrainStep(
        model,
        opt,
        build_scheduler(opt, train),
        grad_clip=1.0,
        autocast=autocast_factory("bf16" if args.gpu else "fp32", device),
        device=device,
        sync=sync,
    )
    if args.gpu:
        torch.cuda.reset_peak_memory_stats()  # the steps' peak, as for the DeepSpeed rows
    losses, times, step_peaks = [], [], []
    for s in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step_fn([batch(s * world + rank, mcfg.vocab_size, shape)]).loss)
        if args.gpu:
            torch.cuda.synchronize()
            step_peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        times.append(time.perf_counter() - t0)
    report = engine.report() if engine is not None else {}
    step_s = statistics.median(times[1:] or times)
    result = {
        "losses": losses,
        "step_s": step_s,
        "tflops": 6 * counts.active * shape[0] * shape[1] / step_s / 1e12,
        "peak_gpu_gb": _peak_gpu_bytes(report) / 2**30 if args.gpu else None,
        "rss_per_param": (rss_bytes("VmHWM") - base) / counts.total,
        "host_per_param": host_bytes(engine, device) / counts.total if engine else None,
        "params": counts.total,
        "peak_device_mb": report.get("peak_device_mb"),
        "evictions": report.get("evictions"),
        "step_times": times,
        "step_peak_gpu_gb": step_peaks,  # running peak after each step: where a budget broke
        "engine_report": report,  # the whole of it, for what a short GPU session cannot rerun
    }
    torch.save(result, Path(out) / f"{name}-{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


def _peak_gpu_bytes(report: dict) -> int:
    """Peak over the steps; the engine's warm-up probe resets the allocator's peak, so its own
    record of the warm-up's peak counts too."""
    return max(torch.cuda.max_memory_allocated(), report.get("warmup_device_peak_bytes", 0))


def reference(args: argparse.Namespace, world: int) -> list[float]:
    """Single process, both ranks' batches as micro-batches (what data parallelism computes)."""
    mcfg = model_config(args)
    train = TrainConfig(steps=args.steps, batch_size=BATCH, lr=1e-3, warmup_steps=1, device="cpu")
    model, opt, _, _ = _build(0, 1, {}, mcfg, train, CPU, args.recompute)
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


def adam_rate(numel: int, repeats: int = 5) -> tuple[float, float, float]:
    """params/s of the engine's shard AdamW (host-resident payloads; fp32, then bf16 gradient
    shards, upcast shard by shard) vs torch fused CPU AdamW."""
    from myriad.engine.optim import ShardAdamW, shard_param

    def timed(opt: torch.optim.Optimizer) -> float:
        opt.step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            opt.step()
        return numel * repeats / (time.perf_counter() - t0)

    def shard_adamw(params: list, **kw: Any) -> ShardAdamW:
        groups = [{"params": params, "weight_decay": 0.01}]
        none = lambda *_: None  # noqa: E731  # no memory manager to call
        return ShardAdamW(
            groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, before_step=none, after_step=none, **kw
        )

    shard = shard_param(torch.randn(numel))
    assert shard.grad is not None
    shard.grad.normal_()
    mine = shard_adamw([shard])
    shards = [shard_param(torch.randn(numel // 4), torch.bfloat16) for _ in range(4)]
    low = {s: torch.randn(s.numel()).bfloat16() for s in shards}
    mine_bf16 = shard_adamw(shards, low_grads=low, reset_grad=lambda p: None)
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    ref = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    return timed(mine), timed(mine_bf16), timed(ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--modes", nargs="*", help="default: every mode of the chosen table")
    parser.add_argument("--gpu", action="store_true", help="the 2.8 B model on one GPU")
    parser.add_argument("--model", choices=("dense", "moe"), default="dense", help="GPU model")
    parser.add_argument("--budget-gb", type=float, default=31.0, help="GPU: engine budget")
    parser.add_argument("--gpu-layers", type=int, default=26, help="GPU model depth")
    parser.add_argument(
        "--recompute", action="store_true", help="activation checkpointing in every mode"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--no-adam", action="store_true", help="skip the optimizer rate")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    table = GPU_MODES if args.gpu else MODES
    modes = args.modes or list(table)
    refs = {} if args.gpu else {w: reference(args, w) for w in (1, 2)}
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name in modes:
            world = table[name][0]
            if name.startswith("deepspeed"):
                r = _deepspeed(args, table[name][1]["stage"], Path(out) / f"{name}.json")
                if r is None:
                    continue
            else:
                spawn_args = (world, _free_port(), name, args, out)
                try:
                    mp.spawn(worker, args=spawn_args, nprocs=world, join=True)
                except mp.ProcessRaisedException as exc:  # e.g. a budget too small: go on
                    print(f"{name} failed: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
                    continue
                r = [torch.load(Path(out) / f"{name}-{i}.pt") for i in range(world)]
            # GPU: compared with the first mode's losses (bf16: a sanity check, not exactness).
            ref = refs[world] if refs else (rows[0][3] if rows else r[0])["losses"]
            diff = max(abs(a - b) / abs(b) for a, b in zip(r[0]["losses"], ref, strict=True))
            mean = {k: _mean([x[k] for x in r]) for k in ("rss_per_param", "host_per_param")}
            rows.append((name, world, diff, {**r[0], **mean}))
    if not rows:
        sys.exit("no mode ran")
    _print_table(args, rows)
    if args.json:
        keys = ("name", "ranks", "max_rel_loss_diff")
        rows_json = [{**dict(zip(keys, row[:3], strict=True)), **row[3]} for row in rows]
        args.json.write_text(json.dumps(rows_json, indent=1))
    if not args.gpu and not args.no_adam:
        mine, mine_bf16, ref_rate = adam_rate(64_000_000)
        print(
            f"\nAdamW on 64 M fp32 params (4 shards), {torch.get_num_threads()} threads: engine "
            f"shard AdamW {mine / 1e9:.2f} G params/s ({mine_bf16 / 1e9:.2f} with bf16 gradient "
            "shards), "
            f"torch fused CPU AdamW {ref_rate / 1e9:.2f} G params/s"
        )


def _deepspeed(args: argparse.Namespace, stage: int, path: Path) -> list[dict] | None:
    """The DeepSpeed peer in its own process (it sets up its own process group), if installed."""
    if importlib.util.find_spec("deepspeed") is None:
        print(f"deepspeed is not installed: ZeRO-{stage} row skipped", file=sys.stderr)
        return None
    script = Path(__file__).with_name("engine_deepspeed.py")
    command = [sys.executable, str(script), "--stage", str(stage), "--steps", str(args.steps)]
    command += ["--model", args.model, "--layers", str(args.gpu_layers), "--out", str(path)]
    done = subprocess.run(command + ["--recompute"] * args.recompute, check=False)
    if done.returncode != 0:
        print(f"DeepSpeed ZeRO-{stage} failed (exit {done.returncode})", file=sys.stderr)
        return None
    return [json.loads(path.read_text())]


def _mean(values: list) -> float | None:
    return None if values[0] is None else sum(values) / len(values)


def _print_table(args: argparse.Namespace, rows: list) -> None:
    params = rows[0][3]["params"]
    where = torch.cuda.get_device_name() if args.gpu else f"CPU, {os.cpu_count()} cores"
    print(f"\n{params:,} parameters, {args.steps} steps, {where}\n")
    print(
        "| mode | ranks | max rel. loss diff | step s | TFLOP/s | peak GPU GB |"
        " RSS growth B/param (per rank) | engine host B/param (per rank) |"
        " peak managed device MB | evictions |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, world, diff, r in rows:
        peak = "" if r["peak_device_mb"] is None else f"{r['peak_device_mb']:.1f}"
        ev = "" if r["evictions"] is None else str(r["evictions"])
        gpu = "" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.1f}"
        host = "" if r["host_per_param"] is None else f"{r['host_per_param']:.1f}"
        print(
            f"| {name} | {world} | {diff:.1e} | {r['step_s']:.3f} | {r['tflops']:.3f} | {gpu} "
            f"| {r['rss_per_param']:.1f} | {host} | {peak} | {ev} |"
        )
    if args.gpu:  # what bounds the largest model with offload: host RAM per parameter
        usable = 0.9 * _mem_total_bytes()
        print(f"\nLargest model host RAM holds (90 % of {usable / 0.9 / 2**30:.0f} GiB / RSS per")
        print("parameter, extrapolated from this model; the GPU budget must still fit a layer):")
        for name, _, _, r in rows:
            if name != "none":  # everything on the GPU: bound by GPU memory instead
                print(f"  {name}: {usable / r['rss_per_param'] / 1e9:.1f} B parameters")


def _mem_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
