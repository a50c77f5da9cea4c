"""Does MoE buy a lower loss at equal active compute? tiny-zh MoE vs a dense twin.

The dense twin is the same recipe with ``model.moe.every = 0``: every FFN is a dense SwiGLU of
width ``d_ff`` (1024), which equals the active width of a top-2 MoE layer of 512-wide experts,
so both models spend the same FLOPs per token (the MoE adds only its router). Both train on the
same tokens in the same order from the same seeds; we compare held-out loss at equal tokens and
wall time per step. Run:  python benchmarks/moe_vs_dense.py [--seeds 0 1] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from machine import machine_name

from myriad.config import load_recipe
from myriad.model import count_parameters
from myriad.train.metrics import read_metrics
from myriad.train.pretrain import run_pretrain

VARIANTS = {"myriad-moe": [], "dense": ["model.moe.every=0"]}


def heldout_and_step_time(path: Path) -> tuple[dict[int, float], float]:
    """Held-out loss by step, and the median seconds per training step."""
    rows = read_metrics(path)
    heldout = {r["step"]: r["heldout_loss"] for r in rows if r["kind"] == "heldout"}
    elapsed = [r["elapsed"] for r in rows if r["kind"] == "train"]
    step_times = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    return heldout, statistics.median(step_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=0, help="0 keeps the recipe's")
    parser.add_argument("--out", default="runs/moe-vs-dense")
    args = parser.parse_args()

    results: dict[str, list[tuple[dict[int, float], float]]] = {}
    for name, overrides in VARIANTS.items():
        for seed in args.seeds:
            sets = [*overrides, f"train.seed={seed}"]
            if args.steps:
                sets.append(f"train.steps={args.steps}")
            cfg = load_recipe("tiny-zh", sets)
            out = Path(args.out) / f"{name}-seed{seed}"
            start = time.perf_counter()
            result = run_pretrain(cfg, out, resume=False, log=lambda *_: None)
            wall = time.perf_counter() - start
            results.setdefault(name, []).append(heldout_and_step_time(result.metrics_path))
            counts = count_parameters(cfg.model)
            print(
                f"{name} seed {seed}: total {counts.total:,} active {counts.active:,}; "
                f"wall {wall:.0f} s with data preparation"
            )

    print(f"\nmachine: {machine_name()}; seeds {args.seeds}\n")
    steps = sorted(results["dense"][0][0])
    print("| step | " + " | ".join(f"{n} held-out loss" for n in VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for step in steps:
        cells = [statistics.mean(r[0][step] for r in results[n]) for n in VARIANTS]
        print(f"| {step} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    times = {n: statistics.mean(r[1] for r in results[n]) for n in VARIANTS}
    print("\n| model | s/step | ratio to dense |\n|---|---|---|")
    for name in VARIANTS:
        print(f"| {name} | {times[name]:.3f} | {times[name] / times['dense']:.2f} |")


if __name__ == "__main__":
    main()
