"""The ablation's report: each run's loss curve on cost axes (tokens, FLOPs, wall time), the
markdown table against the baseline of the same seed, and the plots (used by ``ablate.py``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machine import machine_name

from myriad.config import RunConfig
from myriad.data.curriculum import seq_len_at
from myriad.train.metrics import read_metrics

Run = tuple[RunConfig, Path]  # a run's config and its folder
TOKENS_PER_STEP = 16 * 128  # tiny-zh: batch_size x seq_len


def train_flops(cfg: RunConfig) -> float:
    """Training FLOPs of a whole run: 3x the forward matmul FLOPs (``myriad.model.flops``),
    step by step, so a sequence-length warm-up, attention reuse (training mode: recompute with
    probability p) and frozen routing are counted as run. Masked-LM heads run on mask_prob * S.
    """
    from myriad.model.flops import forward_flops

    t, d = cfg.train, cfg.data
    freeze = getattr(t, "freeze_routing_step", 0)
    total = 0.0
    for step in range(t.steps):
        s = seq_len_at(step, d.curriculum, d.seq_len)
        labelled = d.mask_prob * s if cfg.model.objective == "mlm" else None
        frozen = 0 < freeze <= step
        fwd = forward_flops(
            cfg.model, s, labelled_positions=labelled, reuse="training", frozen_routing=frozen
        )
        total += 3 * fwd.total * t.batch_size * t.grad_accum * d.seq_len / s
    return total


@dataclass
class RunSummary:
    """One variant and seed, source run included: a loss curve on cumulative cost axes."""

    tokens: list[float]  # cumulative training tokens at each held-out evaluation
    flops: list[float]
    wall: list[float]  # seconds of training (evaluations included), source run included
    loss: list[float]
    step_s: float  # median seconds per step of the measured run
    flops_per_token: float  # of the measured run
    balance: float | None  # max/mean tokens per expert at the last evaluation
    churn: list[tuple[float, float]]  # (share of training done, churn) per evaluation
    handover: tuple[float, float] | None  # hot-start: source's last loss, new model's first
    source_tokens: float  # tokens of the source run (0 without one)

    @property
    def final_loss(self) -> float:
        return self.loss[-1]


def summarize_run(runs: list[Run]) -> RunSummary:
    """Chain the source run (if any) and the measured run into one curve."""
    handover = None
    src_tokens = 0.0
    tokens: list[float] = []
    flops: list[float] = []
    wall: list[float] = []
    loss: list[float] = []
    base_tokens = base_flops = base_wall = 0.0
    for k, (cfg, folder) in enumerate(runs):
        rows = read_metrics(folder / "metrics.jsonl")
        held = [r for r in rows if r["kind"] == "heldout"]
        train = [r for r in rows if r["kind"] == "train"]
        run_flops = train_flops(cfg)
        per_token = run_flops / max(train[-1]["tokens"], 1)
        if k:  # the continuation's step 0 is the hot-started model before any update
            handover = (loss[-1], held[0]["heldout_loss"])
            src_tokens = base_tokens
        for r in held:
            tokens.append(base_tokens + r["tokens"])
            flops.append(base_flops + r["tokens"] * per_token)
            wall.append(base_wall + r["elapsed"])
            loss.append(r["heldout_loss"])
        base_tokens, base_flops, base_wall = tokens[-1], flops[-1], wall[-1]
    elapsed = [r["elapsed"] for r in train]
    step_s = statistics.median(b - a for a, b in zip(elapsed, elapsed[1:], strict=False))
    last = held[-1]
    balance = last.get("expert_load_max_over_mean")
    if balance is None:
        tail = [r["expert_load_max_over_mean"] for r in train[-10:]]
        balance = statistics.mean(tail) if None not in tail else None
    steps = cfg.train.steps
    churn = [
        (r["step"] / steps, r["routing_churn"]) for r in held if r.get("routing_churn") is not None
    ]
    return RunSummary(
        tokens, flops, wall, loss, step_s, per_token, balance, churn, handover, src_tokens
    )


def _at(xs: list[float], ys: list[float], x: float) -> float | None:
    """y at x by linear interpolation; None past the end of the curve."""
    if x > xs[-1]:
        return None
    for (x0, y0), (x1, y1) in zip(
        zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False
    ):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[0]


def _reach(run: RunSummary, target: float) -> tuple[float, float] | None:
    """(tokens, FLOPs) at which the curve first reaches ``target`` (interpolated), or None."""
    for i, value in enumerate(run.loss):
        if value <= target:
            if i == 0:
                return run.tokens[0], run.flops[0]
            frac = (run.loss[i - 1] - target) / (run.loss[i - 1] - value)
            tok = run.tokens[i - 1] + frac * (run.tokens[i] - run.tokens[i - 1])
            fl = run.flops[i - 1] + frac * (run.flops[i] - run.flops[i - 1])
            return tok, fl
    return None


def _mean_pm(values: list[float], fmt: str = "{:.4f}") -> str:
    mean = statistics.mean(values)
    half = (max(values) - min(values)) / 2
    return (fmt + " ± " + fmt).format(mean, half) if len(values) > 1 else fmt.format(mean)


def table_row(
    name: str, runs: list[RunSummary], base: list[RunSummary], reference: str, step_s: float | None
) -> str:
    """One markdown row; every comparison is against the baseline run of the same seed."""
    final = [r.final_loss for r in runs]
    pairs = list(zip(runs, base, strict=True))
    delta = [r.final_loss - b.final_loss for r, b in zip(runs, base, strict=True)]
    # Equal wall time: both curves at the time the shorter of the two runs ended.
    walls = [min(r.wall[-1], b.wall[-1]) for r, b in zip(runs, base, strict=True)]
    gaps = [
        (_at(r.wall, r.loss, w) or r.final_loss) - (_at(b.wall, b.loss, w) or b.final_loss)
        for r, b, w in zip(runs, base, walls, strict=True)
    ]
    wall_cell = f"{_mean_pm(gaps, '{:+.4f}')} at {statistics.mean(walls):.0f} s"
    reached = [_reach(r, b.final_loss) for r, b in zip(runs, base, strict=True)]
    if all(x is not None for x in reached):
        tok = [x[0] / b.tokens[-1] for x, b in zip(reached, base, strict=True) if x]
        fl = [x[1] / b.flops[-1] for x, b in zip(reached, base, strict=True) if x]
        reach_cell = f"{_mean_pm(tok, '{:.0%}')} / {_mean_pm(fl, '{:.0%}')}"
    else:
        reach_cell = f"not reached ({sum(x is not None for x in reached)}/{len(runs)} seeds)"
    balance = [r.balance for r in runs if r.balance is not None]
    churn_last = [r.churn[-1][1] for r in runs if r.churn]
    churn_20 = [min(r.churn, key=lambda c: abs(c[0] - 0.2))[1] for r in runs if r.churn]
    churn_cell = (
        f"{statistics.mean(churn_20):.1%} / {statistics.mean(churn_last):.1%}"
        if churn_last
        else "—"
    )
    cells = [
        name,
        _mean_pm(final),
        _mean_pm(delta, "{:+.4f}"),
        wall_cell,
        reach_cell,
        f"{step_s if step_s is not None else statistics.mean(r.step_s for r in runs):.3f}",
        f"{statistics.mean(r.flops_per_token for r in runs) / 1e6:.1f} "
        f"({statistics.mean(r.flops[-1] / b.flops[-1] for r, b in pairs):.0%})",
        f"{statistics.mean(balance):.2f}" if balance else "—",
        churn_cell,
        reference,
    ]
    return "| " + " | ".join(cells) + " |"


def plot_curves(
    results: dict[str, list[RunSummary]], folder: Path, section: str, time_label: str
) -> list[Path]:
    """Held-out loss against tokens and against wall time, every seed, one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for axis, label, fname in (
        ("tokens", "training tokens (source run included)", f"techniques-{section}-tokens.png"),
        ("wall", time_label, f"techniques-{section}-time.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k, (name, runs) in enumerate(results.items()):
            for j, r in enumerate(runs):
                xs = getattr(r, axis)
                ax.plot(xs, r.loss, color=f"C{k}", alpha=0.8, label=name if j == 0 else None)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out masked-LM loss")
        ax.set_ylim(top=min(max(r.loss[0] for rs in results.values() for r in rs), 9.5))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _handovers(results: dict[str, list[RunSummary]]) -> list[str]:
    """For hot-start variants: held-out loss of the source at its end and of the new model."""
    lines = []
    for name, runs in results.items():
        pairs = [r.handover for r in runs if r.handover is not None]
        if pairs:
            before = statistics.mean(p[0] for p in pairs)
            after = statistics.mean(p[1] for p in pairs)
            lines.append(
                f"- {name}: held-out loss {before:.4f} at the source's end, {after:.4f} for the "
                "hot-started model before its first update"
            )
    return [*lines, ""] if lines else []


def write_report(doc: Path, results, skipped: dict[str, str], args, variants: dict[str, Any]):
    """Replace the measured section of ``doc`` (between its markers); keep the prose around it.

    ``variants`` maps a name to its ``ablate.Variant`` (for the notes and published numbers).
    """
    begin, end = f"<!-- ablation:{args.section}:begin -->", f"<!-- ablation:{args.section}:end -->"
    base = results["baseline"]
    timed = args.step_times
    if timed:  # wall axis from the interleaved step times: machine load drops out
        for name, runs in results.items():
            for r in runs:
                t_src = timed.get(f"{name} (source)", 0.0)
                r.wall = [
                    min(x, r.source_tokens) / TOKENS_PER_STEP * t_src
                    + max(0.0, x - r.source_tokens) / TOKENS_PER_STEP * timed[name]
                    for x in r.tokens
                ]
    header = (
        "| variant | held-out loss, equal tokens | Δ vs baseline "
        f"| Δ at equal {'step' if timed else 'wall'} time "
        "| tokens / FLOPs to baseline's final loss "
        f"| s/step{' (interleaved)' if timed else ' (median of the run)'} "
        "| train MFLOPs/token of the measured run (all FLOPs vs baseline) "
        "| load max/mean | churn at ~20 % / last eval | published |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        table_row(n, rs, base, variants[n].reference, timed.get(n)) for n, rs in results.items()
    ]
    time_label = (
        "seconds of training steps, from interleaved step times (source included)"
        if timed
        else "seconds of training as run, evaluations included (source included)"
    )
    plots = plot_curves(results, doc.parent, args.section, time_label)
    lines = [
        begin,
        f"Measured on {args.machine or machine_name()} ({time.strftime('%Y-%m-%d')}): "
        "`python benchmarks/ablate.py "
        f"--steps {args.steps} --seeds {' '.join(map(str, args.seeds))}`; "
        f"{args.steps} steps of 16 x 128 tokens per run, held-out loss every {args.eval_every} "
        "steps on the same 8 held-out batches; mean ± half-range over seeds; comparisons are "
        "against the baseline run of the same seed.",
        "",
        header,
        *rows,
        "",
        *(f"![{p.stem}]({p.name})" for p in plots),
        "",
        *_handovers(results),
        "Variants (the `--set` overrides are in `VARIANTS` at the top of `benchmarks/ablate.py`):",
        "",
        *(f"- **{n}**: {variants[n].notes or 'tiny-zh as shipped'}" for n in results),
        *(f"- **{n}**: not run here: {why}" for n, why in skipped.items()),
        end,
    ]
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Techniques\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    doc.write_text(head + "\n".join(lines) + tail, encoding="utf-8")
    print(f"wrote {doc}")
