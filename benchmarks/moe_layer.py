"""MoE layer forward+backward: Myriad vs Hugging Face Mixtral vs the floor, all in one run.

The floor of a shape is the larger of
  * the measured time of a dense SwiGLU FFN doing the same active FLOPs (T*K tokens through one
    FFN of width F, input gradient included), and
  * the expert-weight traffic, 3 x bytes of all expert weights (read forward, read backward,
    gradients written) over the memory bandwidth measured in this run by a large copy
    ((bytes read + bytes written) / time).
"fraction of floor" = floor / time (1.0 = at the floor). FLOP/s counts only the experts' useful
work, 6 x T*K x 3 x D x F for forward+backward (router, padding and permutations not counted).
The row "dense-ffn + router" adds the router's fp32 D -> E linear (forward+backward, timed in the
same run) to the dense FFN: compute every MoE layer with a trained router must do but the floor
leaves out, so its fraction of the floor is the most such a layer can reach at that shape.

Routing is near-uniform (small router weights, as after load balancing) and identical for every
implementation: the HF block gets copies of Myriad's weights.

    python benchmarks/moe_layer.py                      # CPU fp32, the three CPU shapes
    python benchmarks/moe_layer.py --device cuda --dtype bf16 --shapes gpu --json

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from myriad.model import gemm_batch
from myriad.model.config import MoEConfig
from myriad.model.layers import SwiGLU
from myriad.model.moe import MoEFeedForward

SHAPES = {  # (T, D, F, E, K)
    "cpu": [(2048, 256, 512, 8, 2), (2048, 256, 256, 64, 2), (2048, 256, 128, 256, 1)],
    "gpu": [
        (8192, 4096, 14336, 8, 2),
        (16384, 2048, 1408, 64, 6),
        (32768, 1024, 1024, 512, 1),
        (65536, 1024, 1024, 1536, 1),
    ],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Step = Callable[[], object]
ROUTER = "router (fp32 linear D->E)"
HF_EAGER_MAX_EXPERTS_CUDA = 256  # beyond this, HF's eager loop is skipped on GPU (see row note)


class Timer:
    """Median wall time of steps after warm-up; CUDA events on GPU.

    Candidates of one shape are timed *interleaved* (one step of each per round, order rotated),
    so load from other processes on a shared machine hits all of them alike and the ratios hold.
    A candidate whose step takes over ``slow_s`` gets only ``slow_repeats`` (noted in its row).
    """

    def __init__(self, device: torch.device, repeats: int, warmup: int, slow_s: float = 2.0):
        self.device, self.repeats, self.warmup, self.slow_s = device, repeats, warmup, slow_s
        self.slow_repeats = 2

    def once(self, step: Step, reset: Step | None = None) -> float:
        if reset is not None:
            reset()
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    def __call__(self, step: Step, reset: Step | None = None) -> float:
        for _ in range(self.warmup):
            self.once(step, reset)
        return statistics.median(self.once(step, reset) for _ in range(self.repeats))

    def interleaved(self, steps: dict[str, tuple]) -> dict[str, tuple[float, str]]:
        """``{name: (step, reset)}`` -> ``{name: (median seconds, note)}``."""
        slow: dict[str, tuple] = {}
        fast: dict[str, tuple] = {}
        for name, (step, reset) in steps.items():
            first = self.once(step, reset)
            (slow if first > self.slow_s else fast)[name] = (step, reset)
        for step, reset in fast.values():
            for _ in range(self.warmup - 1):
                self.once(step, reset)
        times: dict[str, list[float]] = {name: [] for name in fast}
        names = list(fast)
        for r in range(self.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(self.once(*fast[name]))
        out = {name: (statistics.median(ts), "") for name, ts in times.items()}
        for name, (step, reset) in slow.items():
            ts = [self.once(step, reset) for _ in range(self.slow_repeats)]
            out[name] = (statistics.median(ts), f"slow: median of {self.slow_repeats}")
        return out


def memory_bandwidth(timer: Timer, device: torch.device) -> float:
    """Bytes read + written per second by a large device copy."""
    n_bytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    seconds = timer(partial(dst.copy_, src))
    return 2 * n_bytes / seconds


def fwd_bwd(module: torch.nn.Module, call: Callable, x: torch.Tensor, dy: torch.Tensor):
    """A timed step (forward, backward) and its untimed reset (grads to None, as trainers do)."""

    def step() -> None:
        call(x).backward(dy)

    def reset() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None

    return step, reset


def build_myriad(shape, dtype, device) -> MoEFeedForward:
    T, D, F, E, K = shape
    layer = MoEFeedForward(D, MoEConfig(num_experts=E, top_k=K, d_expert=F))
    with torch.no_grad():
        layer.router.weight.normal_(std=0.1 / D**0.5)  # near-uniform routing
        layer.w_in_EDF2.normal_(std=D**-0.5)
        layer.w_out_EFD.normal_(std=F**-0.5)
    return layer.to(device=device, dtype=dtype)


def build_hf(layer: MoEFeedForward, shape, dtype, implementation: str) -> torch.nn.Module:
    """Mixtral's sparse MoE block with copies of ``layer``'s weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    T, D, F, E, K = shape
    cfg = MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K
    )
    cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg).to(device=layer.w_in_EDF2.device, dtype=dtype)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.w_in_EDF2.transpose(1, 2))
        block.experts.down_proj.copy_(layer.w_out_EFD.transpose(1, 2))
    return block


def bench_shape(shape, timer: Timer, device, dtype) -> list[dict]:
    """Every implementation at one shape, timed interleaved; rows in a fixed order."""
    T, D, F, E, K = shape
    name = f"{T},{D},{F},{E},{K}"
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size, grad=False):
        t = torch.randn(*size, generator=gen).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    x, dy = randn(T, D, grad=True), randn(T, D)
    copy_bytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(copy_bytes // 4, device=device)
    dst = torch.zeros_like(src)
    dense = SwiGLU(D, F).to(device=device, dtype=dtype)
    steps = {
        "dense-ffn (equal FLOPs)": fwd_bwd(
            dense, dense, randn(T * K, D, grad=True), randn(T * K, D)
        )
    }
    steps["copy"] = (partial(dst.copy_, src), None)  # bandwidth, under the same load
    # The router's fp32 matmul is in every MoE layer but not in the floor; dense + router is the
    # compute any layer with a trained router must do at this shape.
    router = torch.nn.Linear(D, E, bias=False).to(device=device)
    steps[ROUTER] = fwd_bwd(router, lambda v: router(v.float()), x, randn(T, E).float())
    notes: dict[str, str] = {}
    failed: dict[str, str] = {}

    layer = build_myriad(shape, dtype, device)
    notes["myriad"] = f"auto -> {layer.strategy_for(x)}"
    strategies = ["auto", "grouped", "padded"] + (["chunked"] if E > 1024 else [])
    if device.type == "cpu" and dtype == torch.float32 and gemm_batch.available():
        strategies.append("gemm_batch")  # MKL's batch GEMM, where Myriad's kernel cannot build
    for strategy in strategies:
        impl = "myriad" if strategy == "auto" else f"myriad-{strategy}"
        steps[impl] = fwd_bwd(layer, partial(_run_myriad, layer, strategy), x, dy)
    for impl in ("grouped_mm", "eager"):
        label = f"hf-mixtral-{impl}"
        if impl == "eager" and device.type == "cuda" and E > HF_EAGER_MAX_EXPERTS_CUDA:
            failed[label] = f"skipped: Python loop over {E} experts on GPU"
            continue
        block = build_hf(layer, shape, dtype, impl)
        steps[label] = fwd_bwd(block, lambda v, b=block: b(v[None])[0], x, dy)

    for impl, (step, reset) in list(steps.items()):  # drop what cannot run; report why
        try:
            timer.once(step, reset)
        except Exception as exc:  # noqa: BLE001 - HF fails at >1024 experts on CUDA
            failed[impl] = f"fails: {_reason(exc)}"
            del steps[impl]
            _free(device)
    results = timer.interleaved(steps)

    bandwidth = 2 * copy_bytes / results["copy"][0]
    dense_s = results["dense-ffn (equal FLOPs)"][0]
    weight_bytes = 3 * E * D * F * torch.finfo(dtype).bits // 8
    traffic_s = 3 * weight_bytes / bandwidth
    floor, flops = max(dense_s, traffic_s), 6 * T * K * 3 * D * F
    rows = [_row("dense-ffn (equal FLOPs)", name, dense_s, flops, floor, "floor term 1")]
    note = f"floor term 2: 3 x {weight_bytes / 1e6:.0f} MB / {bandwidth / 1e9:.0f} GB/s"
    rows.append(_row("weight traffic 3W/BW", name, traffic_s, flops, floor, note))
    note = f"router alone {results[ROUTER][0] * 1e3:.2f} ms, not in the floor"
    rows.append(_row("dense-ffn + router", name, dense_s + results[ROUTER][0], flops, floor, note))
    order = ["myriad", "myriad-grouped", "myriad-padded", "myriad-gemm_batch", "myriad-chunked"]
    order += ["hf-mixtral-grouped_mm", "hf-mixtral-eager"]
    for impl in order:
        if impl in results:
            seconds, slow_note = results[impl]
            note = "; ".join(n for n in (notes.get(impl, ""), slow_note) if n)
            rows.append(_row(impl, name, seconds, flops, floor, note))
        elif impl in failed:
            rows.append(_row(impl, name, None, flops, floor, failed[impl]))
    del steps, layer, src, dst
    _free(device)
    return rows


def _run_myriad(layer: MoEFeedForward, strategy: str, x_TD: torch.Tensor) -> torch.Tensor:
    """One layer serves every strategy (no weight copies: the GPU shapes hold 10 GB of experts)."""
    layer.dispatch_strategy = strategy
    return layer(x_TD).y


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(impl, shape, seconds, flops, floor, note) -> dict:
    return {
        "impl": impl,
        "shape": shape,
        "seconds": seconds,
        "flops_per_s": flops / seconds if seconds else None,
        "fraction_of_floor": floor / seconds if seconds else None,
        "note": note,
    }


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| impl | shape (T,D,F,E,K) | time (ms) | expert TFLOP/s | fraction of floor | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["seconds"] is None:
            lines.append(f"| {r['impl']} | {r['shape']} | — | — | — | {r['note']} |")
            continue
        lines.append(
            f"| {r['impl']} | {r['shape']} | {r['seconds'] * 1e3:.2f} | "
            f"{r['flops_per_s'] / 1e12:.3f} | {r['fraction_of_floor']:.0%} | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available; refusing to fall back to CPU")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    timer = Timer(device, args.repeats, args.warmup)
    bandwidth = memory_bandwidth(timer, device)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else _cpu_name()
    header = (
        f"{machine}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"copy bandwidth at start {bandwidth / 1e9:.1f} GB/s; median of {args.repeats}"
    )
    print(header, file=sys.stderr)
    rows = []
    for shape in SHAPES[args.shapes]:
        shape_rows = bench_shape(shape, timer, device, dtype)
        rows += shape_rows
        if not args.json:
            print(markdown(shape_rows, f"shape {shape}"), file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(markdown(rows, header))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


if __name__ == "__main__":
    main()
