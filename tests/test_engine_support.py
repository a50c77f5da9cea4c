"""Shared helpers for the engine tests (this module holds no tests): spawning gloo ranks, the
tiny model, and one training run either through the engine or as the single-process reference.

The reference for N ranks is one process taking, at every step, the N ranks' batches as N
micro-batches: gradient accumulation averages them exactly as the engine's reduce-scatter does.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train_support import counting_batch, tiny_config

from myriad.engine.comm import Comm
from myriad.engine.config import EngineConfig
from myriad.engine.engine import Engine, apply
from myriad.model import MoETransformerLM
from myriad.train.device import autocast_factory
from myriad.train.optim import build_optimizer, build_scheduler
from myriad.train.step import TrainStep

CPU = torch.device("cpu")
BATCH = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Any, world: int, *args: Any) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` fresh processes; raises if one fails."""
    mp.spawn(_run_then_exit, args=(fn, world, free_port(), *args), nprocs=world, join=True)


def _run_then_exit(rank: int, fn: Any, *args: Any) -> None:
    """``fn``, then, if it returned, leave without the interpreter's teardown: there, gloo's
    worker threads now and then abort the process ("terminate called without an active
    exception", SIGABRT) after all its work is done and written, even after
    ``destroy_process_group`` (about 1 run in 15 here). A failure still raises as usual."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def init_rank(rank: int, world: int, port: int, timeout_s: float = 30.0) -> Comm:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=__import__("datetime").timedelta(seconds=timeout_s),
    )
    return Comm(rank, world, None, timeout_s)


def run_config():
    return tiny_config(steps=4, batch_size=BATCH, warmup_steps=1)


def build_model(cfg: Any) -> MoETransformerLM:
    torch.manual_seed(0)
    return MoETransformerLM(cfg.model)


def make_step(model: MoETransformerLM, cfg: Any, engine: Engine | None) -> TrainStep:
    t = cfg.train
    if engine is None:
        optimizer = build_optimizer(model, t, CPU)
    else:
        betas = (t.beta1, t.beta2)
        optimizer = engine.build_optimizer(
            lr=t.lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay
        )
    return TrainStep(
        model,
        optimizer,
        build_scheduler(optimizer, t),
        grad_clip=t.grad_clip,
        autocast=autocast_factory("fp32", CPU),
        device=CPU,
        sync=engine,
    )


def batches(step: int, world: int) -> list[dict[str, torch.Tensor]]:
    return [counting_batch(BATCH, seed=7, index=step * world + r) for r in range(world)]


def pretrain_reference(cfg: Any, worlds: tuple[int, ...]) -> tuple[MoETransformerLM, list]:
    """What ``run_pretrain`` on torchrun-style ranks must match: one process taking, at step
    i + 1, each of ``worlds[i]`` ranks' batches (rank r's stream seed is seed + 1,000,003 r) as
    one micro-batch. Returns the trained model and the losses."""
    torch.manual_seed(cfg.train.seed)
    model = MoETransformerLM(cfg.model)
    step_fn = make_step(model, cfg, None)
    b, seed = cfg.train.batch_size, cfg.train.seed
    losses = [
        step_fn([counting_batch(b, seed + 1_000_003 * r, i) for r in range(world)]).loss
        for i, world in enumerate(worlds)
    ]
    return model, losses


def rewind(run: Path, step: str) -> Path:
    """``run`` as it stood after checkpoint ``step``: later step directories go, ``latest``
    points at it (a run cut there, to resume)."""
    import shutil

    checkpoints = run / "checkpoints"
    for later in checkpoints.glob("step-*"):
        if later.name > step:
            shutil.rmtree(later)
    (checkpoints / "latest").write_text(step + "\n", encoding="utf-8")
    return run


def reference_losses(cfg: Any, world: int, steps: int) -> list[float]:
    model = build_model(cfg)
    step_fn = make_step(model, cfg, None)
    return [step_fn(batches(s, world)).loss for s in range(steps)]


def apply_engine(model: MoETransformerLM, comm: Comm, **kw: Any) -> Engine:
    ids = torch.zeros(1, 4, dtype=torch.long)
    return apply(
        model,
        EngineConfig(kind="myriad", **kw),
        comm=comm,
        device=CPU,
        run_forward=lambda: model(ids),
    )


def engine_worker(rank: int, world: int, port: int, out: str, modes: dict, steps: int) -> None:
    """One rank running every mode in turn (one process group, so one spawn for all); each
    mode's losses, per-step evictions and manager report go into ``out/rank{rank}.pt``."""
    comm = init_rank(rank, world, port)
    results = {name: train_mode(comm, steps, **kw)[1] for name, kw in modes.items()}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def train_mode(comm: Comm, steps: int, **engine_kw: Any) -> tuple[Engine, dict]:
    """``steps`` steps of the test model through the engine on this rank's batches: the engine,
    and the losses, per-step evictions and manager report."""
    cfg = run_config()
    model = build_model(cfg)
    engine = apply_engine(model, comm, **engine_kw)
    step_fn = make_step(model, cfg, engine)
    losses, evictions = [], []
    for s in range(steps):
        before = engine.manager.evictions
        losses.append(step_fn([batches(s, comm.world)[comm.rank]]).loss)
        evictions.append(engine.manager.evictions - before)
    return engine, {"losses": losses, "evictions": evictions, "report": engine.report()}


def torchrun_env(rank: int, world: int, port: int) -> None:
    """The environment ``torchrun`` gives a rank (for tests that go through ``run_pretrain``)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def run_engine(tmp_path: Path, world: int, steps: int, modes: dict) -> list[dict]:
    spawn(engine_worker, world, str(tmp_path), modes, steps)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
