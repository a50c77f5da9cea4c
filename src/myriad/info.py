"""Human-readable descriptions of a recipe or a checkpoint for ``myriad info``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from myriad.config import RunConfig, from_dict
from myriad.model import count_parameters
from myriad.model.flops import attention_saving, forward_flops


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
    """Floats to 5 significant digits: a loss of 5.2781 and a learning rate of 5e-05 alike."""
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def _flop_lines(cfg: RunConfig) -> list[str]:
    """Forward matmul FLOPs per token (model/flops.py) at the recipe's sequence length."""
    seq_len = cfg.data.seq_len
    mlm = cfg.model.objective == "mlm"
    labelled = cfg.data.mask_prob * seq_len if mlm else None
    per_token = forward_flops(cfg.model, seq_len, labelled_positions=labelled).per_token()
    where = f"{cfg.data.mask_prob:.0%} of positions predicted" if mlm else "causal LM"
    lines = ["", f"forward FLOPs per token (S = {seq_len}, {where})"]
    for key in ("attention", "ffn", "router", "lm_head", "total"):
        lines.append(f"  {key:<16} {per_token[key]:>18,.0f}  ({human_count(per_token[key])})")
    if cfg.model.attn_reuse.reuse_layers(cfg.model.n_layers):
        cut = attention_saving(cfg.model, seq_len, labelled)
        lines.append(
            f"  attention reuse cuts attention FLOPs by {cut['attention_cut_inference']:.1%} "
            f"at inference, {cut['attention_cut_training']:.1%} expected in training"
        )
    return lines


def describe(info: dict[str, Any]) -> str:
    """Config, parameter counts and, when present, the training state of a checkpoint."""
    where = str(Path(info["path"]) / "config.json") if "path" in info else "config"
    cfg: RunConfig = from_dict(RunConfig, info["config"], where=where)
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
    lines += _flop_lines(cfg)
    state = info.get("state")
    if state:
        width = max(len(key) for key in state)
        lines += ["", "training state"]
        lines += [f"  {key:<{width}}  {_short(value)}" for key, value in state.items()]
    return "\n".join(lines)
