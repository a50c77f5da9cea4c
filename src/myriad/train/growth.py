"""Function-preserving growth of a trained model into a wider and/or deeper one (Net2Net/bert2BERT).

Shape legend: V vocabulary, D/d new/old model dim, F/f new/old FFN (or expert) hidden,
Q/q new/old query rows (heads * head dim), K/k new/old key-value rows, E experts.

Width (``d`` -> ``D``): the residual stream is zero-padded and scaled by a = sqrt(D/d). Every
tensor that *writes* into the stream (embedding, attention ``wo``, FFN ``down``, expert
``w_out``) keeps its old block times a and is zero in the new channels, so the new channels stay
0 and the old ones carry a times the old values. The mean square over ``D`` channels of that
stream is then exactly the old mean square over ``d``, so pre-norm RMSNorm (``norm_eps``
included) sees the same rms, and dividing every old gain by a gives the old normalised inputs
exactly. (Zero-padding alone with gains times sqrt(d/D) is off by ~eps/mean-square: 1e-3
relative for a stream of mean square 4e-4.) The final norm's gain is divided by a, and by a
again when the LM head is tied to the (scaled) embedding. New heads (the head dimension is kept,
so rotary frequencies do not change) and new FFN hidden units get random fan-in from the fresh
initialisation and zero fan-out: they add nothing yet, but their output weights receive
gradient at the first step, so they learn (no Net2Net duplication, hence no symmetry to break).

Depth (``L`` -> ``L'``): the old blocks keep their order, spread over the new stack (an MoE
block only lands where the new stack has an MoE block); each new block is a copy of the nearest
old block before it of the same kind, with its attention and FFN output projections zeroed, so
it starts as the identity on the residual stream (bert2BERT's stacking with a zero residual).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from myriad.errors import UserError
from myriad.model import ModelConfig

State = dict[str, torch.Tensor]

# Tensor name suffixes (relative to a block) that write into the residual stream.
_OUTPUT_SIDE = ("attn.wo.weight", "ffn.down.weight", "ffn.w_out_EFD", "ffn.shared.down.weight")


def head_dim(cfg: ModelConfig) -> int:
    return cfg.d_model // cfg.n_heads


def check_growable(src: ModelConfig, dst: ModelConfig, where: str) -> None:
    """Refuse a growth that cannot preserve the function, naming the key that blocks it."""
    problems = []
    for key in ("d_model", "n_layers", "d_ff"):
        if getattr(dst, key) < getattr(src, key):
            problems.append(f"model.{key} shrinks from {getattr(src, key)} to {getattr(dst, key)}")
    if head_dim(dst) != head_dim(src):
        problems.append(
            f"head dim changes from {head_dim(src)} to {head_dim(dst)} (rotary angles would "
            f"change); set model.n_heads = {dst.d_model // head_dim(src)}"
        )
    src_group = src.n_heads // (src.n_kv_heads or src.n_heads)
    dst_group = dst.n_heads // (dst.n_kv_heads or dst.n_heads)
    if src_group != dst_group:
        problems.append(f"query heads per kv head change from {src_group} to {dst_group}")
    sm, dm = src.moe, dst.moe
    if (src.moe.every > 0) != (dst.moe.every > 0):
        problems.append("grow and upcycle in one go is not supported: grow first, then upcycle")
    elif sm.every > 0:
        if (sm.num_experts, sm.top_k) != (dm.num_experts, dm.top_k):
            problems.append("model.moe.num_experts/top_k differ")
        if dm.d_expert < sm.d_expert or dm.num_shared_experts < sm.num_shared_experts:
            problems.append("model.moe.d_expert or num_shared_experts shrinks")
    if src.tie_embeddings and not dst.tie_embeddings:
        pass  # the untied head starts as a copy of the embedding
    elif dst.tie_embeddings and not src.tie_embeddings:
        problems.append("model.tie_embeddings: cannot tie a source with an untied head")
    if problems:
        raise UserError(f"{where}: cannot grow the source model: " + "; ".join(problems))


def _paste(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst`` with its leading block (one slice per dim) replaced by ``src``."""
    out = dst.clone()
    out[tuple(slice(0, n) for n in src.shape)] = src
    return out


def _widen_tensor(name: str, new: torch.Tensor, old: torch.Tensor, d: int, D: int) -> torch.Tensor:
    """Place ``old`` inside the freshly initialised ``new``; zero what writes new output.

    Gains are divided by a = sqrt(D/d) and stream writers multiplied by it (module docstring).
    """
    a = math.sqrt(D / d)
    if name.endswith("norm.weight"):
        out = new / a
        out[:d] = old / a
        return out
    if name == "embed.weight" or name.endswith(_OUTPUT_SIDE):
        old = old * a
    if name.endswith("w_in_EDF2"):
        f = old.shape[-1] // 2
        F = new.shape[-1] // 2
        out = new.clone()
        out[:, :d, :f] = old[..., :f]  # gate half
        out[:, :d, F : F + f] = old[..., f:]  # up half
        return out
    out = _paste(new, old)
    if name == "embed.weight":
        out[:, d:] = 0
    elif name.endswith(_OUTPUT_SIDE):
        if name.endswith("w_out_EFD"):
            out[:, :, d:] = 0
            out[:, old.shape[1] :, :] = 0
        else:
            out[d:, :] = 0
            out[:, old.shape[1] :] = 0
    return out


def _block_kinds(cfg: ModelConfig) -> list[bool]:
    return [cfg.is_moe_layer(i) for i in range(cfg.n_layers)]


def place_layers(src: ModelConfig, dst: ModelConfig, where: str) -> list[int | None]:
    """For each new block, the old block it carries (or None for a new identity block).

    Old block ``i`` goes to the first block at or after ``i * L'/L`` (and after the previous
    one) whose kind (dense or MoE) matches.
    """
    src_kinds, dst_kinds = _block_kinds(src), _block_kinds(dst)
    placed: list[int | None] = [None] * dst.n_layers
    j = 0
    for i, kind in enumerate(src_kinds):
        j = max(j, i * dst.n_layers // src.n_layers)
        while j < dst.n_layers and dst_kinds[j] != kind:
            j += 1
        if j == dst.n_layers:
            raise UserError(
                f"{where}: cannot place source layer {i} ({'MoE' if kind else 'dense'}) in the "
                f"new stack; keep model.moe.every compatible ({src.moe.every} -> {dst.moe.every})"
            )
        placed[j] = i
        j += 1
    return placed


def _block_state(state: State, index: int) -> State:
    prefix = f"blocks.{index}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def grow_state(
    src_state: State, src: ModelConfig, dst: ModelConfig, fresh: State, where: str
) -> State:
    """The grown state dict: ``fresh`` (a new model's init) with the source pasted in.

    Args:
        src_state: the trained model's ``state_dict()``.
        src, dst: the two model configs.
        fresh: ``state_dict()`` of a freshly initialised ``dst`` model (random new units).
        where: names the source in error messages.
    """
    check_growable(src, dst, where)
    d, D = src.d_model, dst.d_model
    out: State = {}
    for name in ("embed.weight", "norm.weight"):
        out[name] = _widen_tensor(name, fresh[name], src_state[name], d, D)
    if dst.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
        out["norm.weight"] = out["norm.weight"] * math.sqrt(d / D)  # the head was scaled by a
    else:
        old_head = src_state.get("lm_head.weight", src_state["embed.weight"])
        out["lm_head.weight"] = _widen_tensor(
            "lm_head.weight", fresh["lm_head.weight"], old_head, d, D
        )
    out.update(_other_top_level(src_state, src, dst, fresh))
    placed = place_layers(src, dst, where)
    last_old: dict[bool, int] = {}
    for j, i in enumerate(placed):
        kind = dst.is_moe_layer(j)
        if i is not None:
            last_old[kind] = i
        source_index = i if i is not None else last_old.get(kind)
        new_block = _block_state(fresh, j)
        if source_index is None:
            grown = dict(new_block)  # no old block of this kind yet: fresh weights
        else:
            old_block = _block_state(src_state, source_index)
            grown = {k: _widen_tensor(k, new_block[k], old_block[k], d, D) for k in new_block}
        if i is None:
            grown = {k: v.zero_() if k.endswith(_OUTPUT_SIDE) else v for k, v in grown.items()}
        out.update({f"blocks.{j}.{k}": v for k, v in grown.items()})
    _check_complete(out, fresh, where)
    return out


def _other_top_level(src_state: State, src: ModelConfig, dst: ModelConfig, fresh: State) -> State:
    """Top-level tensors besides embedding, final norm and head (the shared word router).

    A router fed the RMS-normalised input embedding (``router_input = "word"``) sees it a times
    larger after widening, so its old weights are divided by a; a separate routing embedding
    does not change width.
    """
    out: State = {}
    a = math.sqrt(dst.d_model / src.d_model)
    for name, new in fresh.items():
        if name.startswith("blocks.") or name in ("embed.weight", "norm.weight", "lm_head.weight"):
            continue
        old = src_state.get(name)
        if old is None or old.dim() != new.dim():
            out[name] = new
            continue
        if name.endswith("gate.weight") and dst.moe.router_input == "word":
            old = old / a
        out[name] = _paste(new, old)
    return out


def _check_complete(out: State, fresh: State, where: str) -> None:
    for name, tensor in fresh.items():
        if name not in out or out[name].shape != tensor.shape:
            got = tuple(out[name].shape) if name in out else "nothing"
            raise UserError(f"{where}: parameter {name}: expected {tuple(tensor.shape)}, got {got}")


def add_noise(state: State, names: Callable[[str], bool], scale: float, seed: int) -> None:
    """Perturb the selected tensors in place by ``scale`` times each tensor's std (symmetry)."""
    if scale <= 0:
        return
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(state):
        if names(name):
            t = state[name]
            noise = torch.randn(t.shape, generator=generator, dtype=t.dtype)
            t.add_(noise * (scale * t.float().std().item()))
