"""The DeepSpeed peer of ``benchmarks/engine.py --gpu``: ZeRO-2 or ZeRO-3 with CPU offload.

One process on one GPU trains the same model on the same batches as the engine benchmark's GPU
modes, through DeepSpeed's own engine: bf16 weights on the GPU, fp32 master weights and Adam
moments on the host, stepped by DeepSpeed's vectorised CPU Adam (``DeepSpeedCPUAdam``, built
just in time on first use). ZeRO-2 offloads the optimizer; ZeRO-3 offloads parameters too.
It writes one JSON object with the same keys as the engine benchmark's rows.

DeepSpeed is not a Myriad dependency: on the GPU machine it is installed from carried wheels
(see ``benchmarks/gpu_engine.sh``).

Run:  python benchmarks/engine_deepspeed.py --stage 2 --steps 4 --model dense --out ds2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from engine import batch, gpu_model_config, rss_bytes, warm_up

from myriad.model import MoETransformerLM
from myriad.model.params import count_parameters


def ds_config(stage: int, micro_batch: int) -> dict:
    """The issue's peer setup: bf16, AdamW, clipping 1.0, states in pinned host memory."""
    zero: dict = {
        "stage": stage,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    if stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
        },
        "steps_per_print": 10**9,
    }


def run(stage: int, steps: int, model_kind: str, layers: int = 26, recompute: bool = False) -> dict:
    import deepspeed

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    deepspeed.init_distributed(dist_backend="nccl")
    torch.cuda.set_device(0)
    warm_up(torch.device("cuda"))  # the same RSS baseline as the engine benchmark's modes
    base = rss_bytes()
    mcfg = gpu_model_config(model_kind, layers)
    torch.manual_seed(0)
    with torch.device("cuda"):  # built on the GPU, as the engine benchmark's modes are
        model = MoETransformerLM(mcfg)
    model.checkpoint_blocks = recompute
    counts = count_parameters(mcfg)
    shape = (4, 2048)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(stage, shape[0])
    )
    torch.cuda.reset_peak_memory_stats()  # the step's peak, as for the other modes
    losses, times = [], []
    for s in range(steps):
        t0 = time.perf_counter()
        b = batch(s, mcfg.vocab_size, shape)
        out = engine(b["input_ids"].cuda(), b["labels"].cuda())
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:] or times)
    return {
        "losses": losses,
        "step_s": step_s,
        "tflops": 6 * counts.active * shape[0] * shape[1] / step_s / 1e12,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
        "rss_per_param": (rss_bytes("VmHWM") - base) / counts.total,
        "host_per_param": None,
        "params": counts.total,
        "peak_device_mb": None,
        "evictions": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=(2, 3), required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", choices=("dense", "moe"), default="dense")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--recompute", action="store_true", help="activation checkpointing")
    args = parser.parse_args()
    result = run(args.stage, args.steps, args.model, args.layers, args.recompute)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
