"""Hot-start: begin a run from a trained checkpoint (``myriad pretrain --init-from CKPT``).

The source checkpoint's own config decides what happens, by comparing shapes with the recipe:

* ``load``: every parameter has the same shape; the weights are copied (a new optimizer starts).
* ``upcycle``: the source is dense, the recipe is MoE with the same dims (sparse upcycling,
  Komatsuzaki et al. 2022). Every expert starts from the dense FFN of its layer, the router is
  new, everything else carries over. ``train.upcycle = "copy"``: each expert is an exact copy
  (plus ``train.upcycle_noise`` times each tensor's std of Gaussian noise, so experts can
  diverge); with ``norm_topk`` and top-k > 1 the combine weights sum to 1, so the MoE computes
  the dense function exactly. ``"split"``: expert ``e`` takes ``d_expert`` of the dense hidden
  units, a window starting at ``e * d_ff / E`` (wrapping), its output scaled by
  ``d_ff / d_expert``: with uniform routing the expected output is the dense one, exactly so
  when ``top_k == num_experts``; experts differ from the start and each token pays only
  ``top_k * d_expert`` hidden units.
* ``grow``: the recipe is wider and/or deeper (see ``growth.py``); the function is preserved.

Shared experts of an upcycled layer start with a zero output projection (function preserved).
The source run's ``tokenizer.json`` is reused, so token ids mean the same thing.

Shape legend: D model dim, f dense hidden, F expert hidden, E experts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from myriad.config import RunConfig, from_dict
from myriad.data.tokenizer import file_hash
from myriad.errors import UserError
from myriad.model import ModelConfig, MoETransformerLM
from myriad.train import checkpoint
from myriad.train.growth import State, add_noise, grow_state

UPCYCLE_METHODS = ("copy", "split")


def source_checkpoint(path: str) -> tuple[Path, RunConfig]:
    """The step directory ``path`` names (run, checkpoints or step dir) and its run config."""
    step_dir = checkpoint.resolve_checkpoint(Path(path).expanduser())
    config_path = step_dir / checkpoint.CONFIG
    return step_dir, from_dict(RunConfig, checkpoint.read_json(config_path), where=str(config_path))


def source_tokenizer(step_dir: Path) -> Path:
    """The tokenizer the source run trained with: ``<run>/tokenizer.json``."""
    path = step_dir.parent.parent / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"--init-from: the source run has no tokenizer at {path}")
    return path


def prepare_config(cfg: RunConfig) -> RunConfig:
    """The config to train with: ``data.tokenizer`` set to the source run's tokenizer.

    Raises:
        UserError: vocabulary size or tokenizer differ from the source's, or a bad option.
    """
    t = cfg.train
    if t.upcycle not in UPCYCLE_METHODS:
        raise UserError(f"train.upcycle must be one of {UPCYCLE_METHODS}, got {t.upcycle!r}")
    if t.upcycle_noise < 0:
        raise UserError(f"train.upcycle_noise must be >= 0, got {t.upcycle_noise}")
    step_dir, src = source_checkpoint(t.init_from)
    if src.model.vocab_size != cfg.model.vocab_size:
        raise UserError(
            f"--init-from {t.init_from}: model.vocab_size is {cfg.model.vocab_size}, the "
            f"source's is {src.model.vocab_size}; the vocabulary must match"
        )
    if src.model.objective != cfg.model.objective:
        raise UserError(
            f"--init-from {t.init_from}: model.objective {cfg.model.objective!r} differs from "
            f"the source's {src.model.objective!r}"
        )
    tokenizer = source_tokenizer(step_dir)
    if cfg.data.tokenizer:
        given = Path(cfg.data.tokenizer).expanduser()
        if not given.is_file() or file_hash(given) != file_hash(tokenizer):
            raise UserError(
                f"data.tokenizer = {cfg.data.tokenizer!r} is not the tokenizer of the "
                f"--init-from run ({tokenizer}); leave data.tokenizer empty to reuse it"
            )
        return cfg
    data = dataclasses.replace(cfg.data, tokenizer=str(tokenizer.resolve()))
    return dataclasses.replace(cfg, data=data)


def _shapes(state: State) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def choose_mode(src: ModelConfig, dst: ModelConfig, src_state: State, fresh: State) -> str:
    """``load``, ``upcycle`` or ``grow``, from the two configs and their tensor shapes."""
    if src.moe.every == 0 and dst.moe.every > 0:
        return "upcycle"
    if _shapes(src_state) == _shapes(fresh):
        return "load"
    return "grow"


def _upcycle_ffn(dense: State, fresh: State, moe: ModelConfig, method: str, where: str) -> State:
    """One MoE layer's tensors (relative names) from a dense SwiGLU's ``gate``/``up``/``down``."""
    gate_fD, up_fD, down_Df = dense["gate.weight"], dense["up.weight"], dense["down.weight"]
    f, E, F = gate_fD.shape[0], moe.moe.num_experts, moe.moe.d_expert
    if method == "copy" and f != F:
        raise UserError(
            f"{where}: train.upcycle = 'copy' needs model.moe.d_expert == the source's d_ff "
            f"({f}), got {F}; or use train.upcycle = 'split'"
        )
    if method == "split" and (f % E != 0 or f < F):
        raise UserError(
            f"{where}: train.upcycle = 'split' needs the source's d_ff ({f}) divisible by "
            f"model.moe.num_experts ({E}) and model.moe.d_expert ({F}) <= {f}"
        )
    w_in, w_out = [], []
    for e in range(E):
        idx_F = (torch.arange(F) + e * f // E) % f if method == "split" else torch.arange(f)
        scale = f / F if method == "split" else 1.0
        w_in.append(torch.cat([gate_fD[idx_F].T, up_fD[idx_F].T], dim=-1))
        w_out.append(down_Df[:, idx_F].T * scale)
    out = {"w_in_EDF2": torch.stack(w_in), "w_out_EFD": torch.stack(w_out)}
    for name, tensor in fresh.items():
        if name.startswith(("router.", "shared.")):
            out[name] = tensor.zero_() if name == "shared.down.weight" else tensor
    return out


def upcycle_state(
    src_state: State, src: ModelConfig, dst: ModelConfig, fresh: State, method: str, where: str
) -> State:
    """The upcycled state dict: dense layers where ``dst`` is dense, experts from the dense FFN."""
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads"):
        if getattr(src, key) != getattr(dst, key):
            raise UserError(
                f"{where}: upcycling keeps model.{key} ({getattr(src, key)} in the source, "
                f"{getattr(dst, key)} in the recipe); grow first, then upcycle"
            )
    out = {k: v for k, v in src_state.items() if not k.startswith("blocks.")}
    for j in range(dst.n_layers):
        prefix = f"blocks.{j}."
        old = {k[len(prefix) :]: v for k, v in src_state.items() if k.startswith(prefix)}
        if dst.is_moe_layer(j):
            new = {k[len(prefix) :]: v for k, v in fresh.items() if k.startswith(prefix + "ffn.")}
            dense = {k[4:]: v for k, v in old.items() if k.startswith("ffn.")}
            ffn = _upcycle_ffn(dense, {k[4:]: v for k, v in new.items()}, dst, method, where)
            old = {k: v for k, v in old.items() if not k.startswith("ffn.")}
            old.update({f"ffn.{k}": v for k, v in ffn.items()})
        out.update({prefix + k: v for k, v in old.items()})
    for name, tensor in fresh.items():  # a model-level router (word-vector routing) is new too
        if not name.startswith("blocks.") and name not in out:
            out[name] = tensor
    return out


def _check_shapes(state: State, fresh: State, where: str) -> None:
    for name, tensor in fresh.items():
        if name not in state:
            raise UserError(f"{where}: parameter {name} is missing from the source")
        if state[name].shape != tensor.shape:
            raise UserError(
                f"{where}: parameter {name} has shape {tuple(state[name].shape)} in the source, "
                f"{tuple(tensor.shape)} in the recipe"
            )
    extra = sorted(set(state) - set(fresh))
    if extra:
        raise UserError(f"{where}: parameter {extra[0]} of the source has no place in the recipe")


def init_from_checkpoint(model: MoETransformerLM, cfg: RunConfig, engine: Any = None) -> str:
    """Overwrite ``model``'s weights from ``cfg.train.init_from``; returns the mode used.

    New tensors (router, new units, identity blocks' inputs) keep ``model``'s own random init;
    noise is drawn from its own generator (seeded from ``train.seed``), not the global one.
    ``engine``: the ``myriad`` engine partitioning ``model``, if any. When the source is engine
    shards of the same model config, each rank then keeps only its own slices of the weights
    (a fresh optimizer), assembling one source tensor at a time, never the whole source model.
    """
    t = cfg.train
    where = f"--init-from {t.init_from}"
    if engine is not None:
        step_dir, src_cfg = source_checkpoint(t.init_from)
        if src_cfg.model == cfg.model and checkpoint.shard_world(step_dir) is not None:
            from myriad.engine.shards import load_shards

            load_shards(engine, step_dir, moments=False)
            return "load"
    src_model, src_cfg = checkpoint.load_model_from_checkpoint(t.init_from)
    src_state = {k: v.detach().clone() for k, v in src_model.state_dict().items()}
    fresh = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # built on CPU
    mode = choose_mode(src_cfg.model, cfg.model, src_state, fresh)
    if mode == "upcycle":
        state = upcycle_state(src_state, src_cfg.model, cfg.model, fresh, t.upcycle, where)
        is_expert = ("w_in_EDF2", "w_out_EFD")
        add_noise(state, lambda n: n.endswith(is_expert), t.upcycle_noise, t.seed)
    elif mode == "grow":
        state = grow_state(src_state, src_cfg.model, cfg.model, fresh, where)
    else:
        state = src_state
    _check_shapes(state, fresh, where)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return mode
