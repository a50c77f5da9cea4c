"""Human-readable descriptions of a recipe or a checkpoint for ``myriad info``."""

from __future__ import annotations

from typing import Any

from myriad.config import RunConfig, from_dict
from myriad.model import count_parameters


def human_count(n: float) -> str:
    """1009013444608 -> '1.01 T'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def _config_lines(raw: dict[str, Any], prefix: str = "") -> list[str]:
    scalars = [(k, v) for k, v in raw.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in raw.items() if isinstance(v, dict)]
    lines = [f"{prefix}{k} = {v!r}" for k, v in scalars]
    for key, table in tables:
        lines.extend(_config_lines(table, f"{prefix}{key}."))
    return lines


def _short(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def describe(info: dict[str, Any]) -> str:
    """Config, parameter counts and, when present, the training state of a checkpoint."""
    cfg: RunConfig = from_dict(RunConfig, info["config"], where="config")
    counts = count_parameters(cfg.model)
    moe = cfg.model.moe
    moe_layers = sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.n_layers))
    lines = [f"# {cfg.name}: {cfg.description}".rstrip(": "), ""]
    lines += _config_lines(
        {k: v for k, v in info["config"].items() if k not in ("name", "description")}
    )
    lines += [
        "",
        "parameters",
        f"  total            {counts.total:>18,}  ({human_count(counts.total)})",
        f"  active per token {counts.active:>18,}  ({human_count(counts.active)})",
        f"  routed experts   {counts.experts:>18,}  "
        f"({moe_layers} MoE layers x {moe.num_experts} experts, top-{moe.top_k})",
        f"  embedding        {counts.embedding:>18,}",
    ]
    state = info.get("state")
    if state:
        width = max(len(key) for key in state)
        lines += ["", "training state"]
        lines += [f"  {key:<{width}}  {_short(value)}" for key, value in state.items()]
    return "\n".join(lines)
