"""The text ``myriad plan`` prints: a memory/time table per offload mode, then the smallest fits."""

from __future__ import annotations

from myriad.engine.cluster import GIB
from myriad.engine.planner import (
    ADAM_PARAMS_PER_S_PER_CORE,
    MFU,
    MODE_TITLES,
    MODES,
    PREFETCH_LAYERS,
    USABLE_FRACTION,
    Fit,
    Plan,
    cluster_sizes,
    fits,
)
from myriad.model import count_parameters


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f}" if n >= GIB or n == 0 else f"{n / GIB:.3f}"


def _row(label: str, values: list[str]) -> str:
    return f"  {label:<26}" + "".join(f"{v:>20}" for v in values)


def _fit_line(mode: str, fit: Fit | None, plan: Plan) -> str:
    title = f"  {MODE_TITLES[mode]:<20}"
    if fit is None:
        most = cluster_sizes(plan.spec)[-1]
        return title + f"none up to {most:,} GPU{'s' * (most > 1)}"
    spec, mem, g = plan.spec, fit.memory, fit.geometry
    nodes = -(-mem.n_gpus // spec.node.gpus)
    where = f"{mem.n_gpus:,} GPU{'s' * (mem.n_gpus > 1)} ({nodes:,} node{'s' * (nodes > 1)})"
    host = mem.host_per_gpu * min(mem.n_gpus, spec.node.gpus)
    line = (
        f"{title}{where}: {_gib(mem.peak)} GiB/GPU, {_gib(host)} GiB host/node, "
        f"{fit.time.total:,.2f} s/step"
    )
    if g.batch != plan.geometry.batch:
        line += f" with --set train.batch_size={g.batch} --set train.grad_accum={g.micro_batches}"
    return line


def format_plan(plan: Plan) -> str:
    """The report ``myriad plan`` prints: a table per mode on the spec, then the smallest fits."""
    cfg, spec, geo, p = plan.cfg, plan.spec, plan.geometry, plan.precision
    counts = count_parameters(cfg.model)
    n = spec.num_gpus
    mems = [plan.memory[mode] for mode in MODES]
    times = [plan.time[mode] for mode in MODES]
    gpu_cap = USABLE_FRACTION * spec.gpu.memory_gib * GIB
    host_cap = USABLE_FRACTION * spec.node.host_memory_gib * GIB
    lines = [
        f"# {cfg.name} on {spec.name}: {spec.description}",
        f"model: {counts.total:,} parameters ({counts.experts:,} in routed experts), "
        f"{counts.active:,} active per token",
        f"per GPU and step: {geo.micro_batches} micro-batch(es) of {geo.batch} x {geo.seq_len} "
        f"tokens ({geo.predicted:,} predicted); {'bf16' if p.weight == 2 else 'fp32'} weights, "
        f"optimizer {p.optimizer} B/param",
        "",
        f"on {n:,} GPU(s), ZeRO-3 partitioning, expert parallel {mems[0].expert_parallel}",
        _row("GiB per GPU", [MODE_TITLES[mode] for mode in MODES]),
        _row("parameters", [_gib(x.params) for x in mems]),
        _row("gradients", [_gib(x.grads) for x in mems]),
        _row("optimizer states", [_gib(x.optimizer) for x in mems]),
        _row("activations", [_gib(x.activations) for x in mems]),
        _row("peak (backward sweep)", [_gib(x.peak) for x in mems]),
        _row(f"usable of {spec.gpu.memory_gib:g} GiB", [_gib(gpu_cap)] * 3),
        _row("host GiB per node", [_gib(x.host_per_gpu * min(n, spec.node.gpus)) for x in mems]),
        _row(f"usable of {spec.node.host_memory_gib:g} GiB", [_gib(host_cap)] * 3),
        _row("host bytes per parameter", ["0", str(p.host), str(p.host)]),
        _row("fits", ["yes" if fits(x, spec) else "no" for x in mems]),
        _row("step time (s)", [f"{t.total:,.3f}" for t in times]),
        _row("  compute", [f"{t.compute:,.3f}" for t in times]),
        _row("  GPU-GPU traffic", [f"{t.gpu_traffic:,.3f}" for t in times]),
        _row("  PCIe", [f"{t.pcie:,.3f}" for t in times]),
        _row("  CPU Adam", [f"{t.cpu_adam:,.3f}" for t in times]),
        "",
        f"smallest cluster of {spec.node.gpus} x {spec.gpu.name} nodes that fits:",
    ]
    lines += [_fit_line(mode, plan.smallest[mode], plan) for mode in MODES]
    if spec.node.network_gbytes_per_s == 0:
        lines.append("  (node.network_gbytes_per_s = 0: this node type is not clustered)")
    lines += [
        "",
        f"assumptions: {MFU:.0%} MFU of {spec.gpu.bf16_tflops:g} bf16 TFLOP/s; transfers overlap "
        "compute, CPU Adam only the next first forward "
        f"({ADAM_PARAMS_PER_S_PER_CORE / 1e9:.2f} G params/s per core); {USABLE_FRACTION:.0%} of "
        f"GPU and host memory usable; {PREFETCH_LAYERS} gathered layers in flight; batch_size is "
        f"per GPU; {'' if geo.recompute else 'no '}activation checkpointing (docs/planner.md)",
    ]
    return "\n".join(lines)
