"""End-of-run PNGs: loss curves and the per-layer expert-load heat map.

Uses matplotlib's object API with the Agg canvas directly (no ``pyplot``), so no global backend is
switched and nothing needs a display.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = alpha * v + (1 - alpha) * avg
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def plot_losses(rows: list[dict[str, Any]], path: Path) -> Path:
    """Train and held-out LM loss (no balancing terms, so the two compare) against the step."""
    train = [r for r in rows if r.get("kind") == "train"]
    heldout = [r for r in rows if r.get("kind") == "heldout"]
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        steps = [r["step"] for r in train]
        losses = [r.get("lm_loss", r["loss"]) for r in train]
        alpha = min(1.0, 10.0 / max(len(losses), 10))  # ~ a 10 %-of-run window
        ax.plot(
            steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train LM loss (raw)"
        )
        ax.plot(steps, ema(losses, alpha), color="tab:blue", label="train LM loss (smoothed)")
    if heldout:
        steps = [r["step"] for r in heldout]
        ax.plot(
            steps, [r["heldout_loss"] for r in heldout], "o-", color="tab:orange", label="held-out"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title("Pre-training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_expert_load(load_LE: torch.Tensor, path: Path, *, title: str = "") -> Path:
    """Heat map of each MoE layer's share of routed tokens per expert (1/E is perfectly even)."""
    share_LE = load_LE.double() / load_LE.double().sum(dim=1, keepdim=True).clamp(min=1)
    n_layers, n_experts = share_LE.shape
    fig = Figure(figsize=(min(2 + 0.35 * n_experts, 18), 1.5 + 0.5 * n_layers), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share_LE.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of layer's routed tokens")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_layers))
    if n_experts <= 32:
        ax.set_xticks(range(n_experts))
    ax.set_title(title or f"Expert load over the run (even = {1 / n_experts:.3f})")
    fig.tight_layout()
    fig.savefig(path)
    return path
