"""Mixed precision in the engine (``engine.param_dtype`` / ``engine.reduce_dtype``), 2 gloo ranks.

The reference is one process doing by hand what the engine's arithmetic should be: fp32 master
model; each step copies the masters into a bf16 copy, runs the two ranks' batches on it as two
micro-batches (each a plain bf16 forward and backward), sums the two bf16 gradients in the
reduce dtype (as the reduce-scatter does), divides by 2, clips in that dtype with an fp32 norm,
upcasts, and runs AdamW on the fp32 masters. Since that is the same arithmetic, the engine and
FSDP2 must agree with it to fp32 tolerance (rel 1e-5), with and without offload.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_engine_support import (
    CPU,
    apply_engine,
    batches,
    build_model,
    init_rank,
    run_config,
    spawn,
    train_mode,
)

from myriad.engine.comm import Comm
from myriad.engine.config import EngineConfig
from myriad.engine.precision import Precision
from myriad.errors import UserError
from myriad.model.moe import MoEFeedForward
from myriad.train.optim import build_optimizer, build_scheduler

STEPS, WORLD = 4, 2
CHUNK_MB = 0.02  # 5,120 fp32 elements: the tiny model spans several chunks
BUDGET_MB = 0.2  # bf16 chunks in use plus a few 14-byte payloads: evicts every step
BF16 = {"param_dtype": "bfloat16"}
ENGINE_MODES = {  # mode -> (engine keys, reference reduce dtype)
    "bf16": ({"chunk_mb": CHUNK_MB, **BF16}, torch.float32),
    "bf16_reduce_bf16": (
        {"chunk_mb": CHUNK_MB, **BF16, "reduce_dtype": "bfloat16"},
        torch.bfloat16,
    ),
    "bf16_offload": (
        {"chunk_mb": CHUNK_MB, **BF16, "reduce_dtype": "bfloat16", "device_budget_mb": BUDGET_MB},
        torch.bfloat16,
    ),
}
FSDP2_MODES = {"fsdp2_bf16": ({**BF16}, torch.float32)}


def reference_losses(reduce_dtype: torch.dtype, world: int = WORLD) -> list[float]:
    """The mixed-precision data-parallel step written out in one process (see module doc)."""
    cfg = run_config()
    t = cfg.train
    master = build_model(cfg)
    optimizer = build_optimizer(master, t, CPU)
    scheduler = build_scheduler(optimizer, t)
    low = copy.deepcopy(master)
    masters, lows = list(master.parameters()), list(low.parameters())
    for pl in lows:  # parameters only: buffers (router biases, rotary tables) stay fp32
        pl.data = pl.data.to(torch.bfloat16)
    for module in low.modules():  # as the engine sets it: the same expert-gradient kernels
        if isinstance(module, MoEFeedForward):
            module.reuse_cpu_grad_buffers = False
    losses = []
    for step in range(STEPS):
        with torch.no_grad():
            for pl, pm in zip(lows, masters, strict=True):
                pl.copy_(pm)
        sums = [torch.zeros_like(p, dtype=reduce_dtype) for p in masters]
        step_losses, loads = [], []
        for batch in batches(step, world):
            low.zero_grad(set_to_none=True)
            out = low(batch["input_ids"], batch["labels"])
            out.loss.backward()
            for acc, pl in zip(sums, lows, strict=True):
                acc.add_(pl.grad.to(reduce_dtype))
            step_losses.append(out.loss.detach())
            loads.append(torch.stack(out.tokens_per_expert))
        grads = [acc.div_(world) for acc in sums]
        total = torch.stack([g.float().pow(2).sum() for g in grads]).sum().sqrt()
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")  # as TrainStep
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for pm, g in zip(masters, grads, strict=True):
            pm.grad = g.mul_(coef).float()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        low.update_router_biases(list(torch.stack(loads).sum(0).unbind()))
        losses.append((torch.stack(step_losses).sum() / world).item())
    return losses


def _run_engine_mode(comm: Comm, rank: int, keys: dict) -> dict:
    engine, result = train_mode(comm, STEPS, **keys)
    chunk = engine.store.chunks[0]
    dtypes = {
        "view": next(engine.model.parameters()).dtype,
        "master": chunk.shard_S.dtype if chunk.shard_S is not None else None,
        "grad_shard": chunk.grad_S.dtype if chunk.grad_S is not None else None,
    }
    return {**result, "dtypes": dtypes}


def _run_fsdp2_mode(comm: Comm, rank: int, keys: dict) -> dict:
    from myriad.engine.runtime import Runtime, wrap
    from myriad.train.device import autocast_factory
    from myriad.train.step import TrainStep

    cfg = run_config()
    model = build_model(cfg)
    runtime = Runtime(EngineConfig(kind="fsdp2", **keys), comm, CPU)
    optimizer, sync = wrap(runtime, model, cfg.train, lambda: None)
    step_fn = TrainStep(
        model,
        optimizer,
        build_scheduler(optimizer, cfg.train),
        grad_clip=cfg.train.grad_clip,
        autocast=autocast_factory("fp32", CPU),
        device=CPU,
        sync=sync,
    )
    return {"losses": [step_fn([batches(s, WORLD)[rank]]).loss for s in range(STEPS)]}


def worker(rank: int, world: int, port: int, out: str) -> None:
    comm = init_rank(rank, world, port)
    results = {name: _run_engine_mode(comm, rank, keys) for name, (keys, _) in ENGINE_MODES.items()}
    for name, (keys, _) in FSDP2_MODES.items():
        results[name] = _run_fsdp2_mode(comm, rank, keys)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision")
    spawn(worker, WORLD, str(out))
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    refs = {dt: reference_losses(dt) for dt in (torch.float32, torch.bfloat16)}
    return ranks, refs


@pytest.mark.parametrize("mode", [*ENGINE_MODES, *FSDP2_MODES])
def test_two_ranks_match_mixed_precision_reference(runs, mode):
    ranks, refs = runs
    ref = refs[{**ENGINE_MODES, **FSDP2_MODES}[mode][1]]
    assert len(ref) == STEPS and ref[-1] < ref[0]
    for r in ranks:
        assert r[mode]["losses"] == pytest.approx(ref, rel=1e-5)


def test_bf16_differs_from_fp32_reference(runs):
    """The comparison has teeth: the fp32 run's losses are not within 1e-5 of the bf16 ones."""
    from test_engine_support import reference_losses as fp32_reference

    ranks, _ = runs
    fp32 = fp32_reference(run_config(), world=WORLD, steps=STEPS)
    assert ranks[0]["bf16"]["losses"] != pytest.approx(fp32, rel=1e-5)


@pytest.mark.parametrize(
    ("mode", "grad_dtype"),
    [("bf16", torch.float32), ("bf16_reduce_bf16", torch.bfloat16)],
)
def test_dtypes_of_views_masters_and_gradient_shards(runs, mode, grad_dtype):
    ranks, _ = runs
    assert ranks[0][mode]["dtypes"] == {
        "view": torch.bfloat16,
        "master": torch.float32,
        "grad_shard": grad_dtype,
    }


def test_bf16_offload_respects_budget_and_evicts_every_step(runs):
    ranks, _ = runs
    for r in ranks:
        report = r["bf16_offload"]["report"]
        assert 0 < report["peak_device_bytes"] <= report["budget_bytes"]
        assert all(n > 0 for n in r["bf16_offload"]["evictions"]), r["bf16_offload"]["evictions"]


def test_payload_is_14_bytes_per_element_with_bf16_gradient_shard():
    """fp32 master 4 + bf16 gradient shard 2 + two fp32 moments 8 (+ one step counter)."""
    bf16 = Precision.named("bfloat16", "bfloat16")
    assert bf16.payload_bytes(1000) == 14 * 1000 + 4
    assert Precision.named("bfloat16", "float32").payload_bytes(1000) == 16 * 1000 + 4
    assert Precision().payload_bytes(1000) == 16 * 1000 + 4


def test_one_process_state_dict_keeps_fp32_masters():
    """state_dict returns the fp32 masters (not the bf16 views) and loading them is exact."""
    from myriad.engine.runtime import install_state_dict_hooks

    cfg = run_config()
    plain = build_model(cfg)
    model = build_model(cfg)
    engine = apply_engine(model, Comm(), chunk_mb=CHUNK_MB, param_dtype="bfloat16")
    install_state_dict_hooks(model, engine)
    saved = model.state_dict()
    for name, value in plain.state_dict().items():
        assert saved[name].dtype == value.dtype and torch.equal(saved[name], value), name
    shifted = {k: v + 1e-3 if v.is_floating_point() else v for k, v in saved.items()}
    model.load_state_dict(shifted)
    for name, value in model.state_dict().items():
        assert torch.equal(value, shifted[name]), name


def test_bf16_offload_resume_through_the_trainer_is_exact(tmp_path, monkeypatch):
    """Checkpoints keep fp32 masters and moments (the bf16 gradient shard is zero between
    steps): a bf16 run with offload, cut after its step-3 checkpoint and resumed, logs the
    uninterrupted run's losses bit for bit."""
    import dataclasses

    from test_train_support import tiny_config, use_fake_data

    from myriad.train import run_pretrain
    from myriad.train.metrics import read_metrics

    engine = EngineConfig(
        kind="myriad", chunk_mb=CHUNK_MB, device_budget_mb=0.5, **BF16, reduce_dtype="bfloat16"
    )
    cfg = dataclasses.replace(tiny_config(steps=6, eval_every=3, checkpoint_every=3), engine=engine)

    def losses(path):
        return [r["loss"] for r in read_metrics(path) if r["kind"] == "train"]

    use_fake_data(monkeypatch)
    full = run_pretrain(cfg, tmp_path / "full", log=lambda _line: None)
    use_fake_data(monkeypatch, fail_at=4)  # stops during step 5, after the step-3 checkpoint
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(cfg, tmp_path / "cut", log=lambda _line: None)
    use_fake_data(monkeypatch)
    resumed = run_pretrain(cfg, tmp_path / "cut", resume=True, log=lambda _line: None)
    assert len(losses(full.metrics_path)) == 6
    assert losses(resumed.metrics_path) == losses(full.metrics_path)


def test_unknown_dtype_is_a_user_error():
    with pytest.raises(UserError, match="engine.param_dtype must be one of"):
        EngineConfig(kind="myriad", param_dtype="float16").validate()
    with pytest.raises(UserError, match="engine.reduce_dtype must be one of"):
        EngineConfig(kind="myriad", reduce_dtype="bf16").validate()


def test_payload_homes_share_one_exact_page_aligned_mapping():
    """A chunk's four homes: one allocation of exactly their bytes (64-byte aligned pieces,
    rounded up to whole pages), starting on a page (what ``cudaHostRegister`` pins)."""
    import mmap

    from myriad.engine.hostmem import ALIGN, home_tensors

    n = 300_001  # 1.2 MB of fp32: above the size that gets a mapping of its own
    specs = [(torch.Size([n]), dt) for dt in (torch.float32, torch.bfloat16)]
    specs += [(torch.Size([n]), torch.float32)] * 2
    homes = home_tensors(specs, pin=False)
    storage = homes[0].untyped_storage()
    assert all(h.untyped_storage().data_ptr() == storage.data_ptr() for h in homes)
    assert storage.data_ptr() % mmap.PAGESIZE == 0
    padded = sum(-(-n * h.element_size() // ALIGN) * ALIGN for h in homes)
    assert storage.nbytes() == -(-padded // mmap.PAGESIZE) * mmap.PAGESIZE
    starts = [h.data_ptr() - storage.data_ptr() for h in homes]
    assert starts == sorted(starts) and all(s % ALIGN == 0 for s in starts)
    for i, h in enumerate(homes):
        h.fill_(i + 1)
    assert [h.float().mean().item() for h in homes] == [1.0, 2.0, 3.0, 4.0]


def test_failed_host_registration_clears_cudas_last_error(monkeypatch):
    """cudaHostRegister refused: the runtime's last error is reset (else PyTorch's next kernel
    launch check raises it), and the home comes from the pinned allocator instead."""
    from myriad.engine import hostmem

    calls: list[str] = []

    class Runtime:  # torch.cuda.cudart() and the loaded libcudart, as far as hostmem uses them
        def cudaHostRegister(self, ptr, length, flags):  # noqa: N802
            calls.append("register")
            return 2  # cudaErrorMemoryAllocation

        def cudaGetLastError(self):  # noqa: N802
            calls.append("clear")

    real_empty = torch.empty

    def empty(*size, pin_memory=False, **kw):  # this CPU build cannot pin: a plain tensor
        if pin_memory:
            calls.append("pinned allocator")
        return real_empty(*size, **kw)

    monkeypatch.setattr(torch.cuda, "cudart", Runtime)
    monkeypatch.setattr(hostmem, "_loaded_cudart", Runtime)
    monkeypatch.setattr(torch, "empty", empty)
    home = hostmem.home_tensors([(torch.Size([hostmem.SMALL]), torch.float32)], pin=True)[0]
    assert calls == ["register", "clear", "pinned allocator"]
    assert home.shape == (hostmem.SMALL,)


def _cuda_run(**keys) -> tuple[list[float], dict]:
    """One process on CUDA, STEPS steps through the engine; its losses, report and payloads."""
    import gc

    from myriad.engine.engine import apply
    from myriad.train.device import autocast_factory
    from myriad.train.step import TrainStep

    gc.collect()
    torch.cuda.empty_cache()
    dev = torch.device("cuda")
    cfg = run_config()
    model = build_model(cfg).to(dev)
    t = cfg.train
    ids = torch.zeros(1, 4, dtype=torch.long, device=dev)
    engine_cfg = EngineConfig(kind="myriad", chunk_mb=CHUNK_MB, **BF16, **keys)
    engine = apply(model, engine_cfg, comm=Comm(), device=dev, run_forward=lambda: model(ids))
    betas = (t.beta1, t.beta2)
    opt = engine.build_optimizer(lr=t.lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay)
    step = TrainStep(
        model,
        opt,
        build_scheduler(opt, t),
        grad_clip=t.grad_clip,
        autocast=autocast_factory("fp32", dev),
        device=dev,
        sync=engine,
    )
    losses = [step(batches(s, 1)).loss for s in range(STEPS)]
    host = [c for c in engine.store.chunks if c.shard_S is not None and not c.shard_S.is_cuda]
    return losses, {
        **engine.report(),
        "host_chunks": len(host),
        "host_pinned": all(c.shard_S.is_pinned() and c.grad_S.is_pinned() for c in host),
        "dtypes": {(c.shard_S.dtype, c.grad_S.dtype) for c in engine.store.chunks},
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_offload_matches_bf16_on_device():
    """bf16 parameters and gradient shards, payloads paged to registered host homes under an
    evicting budget = the same engine with every payload on the GPU. Not bit-exact: host-resident
    shards are stepped by the CPU fused AdamW, device ones by the CUDA kernel, and a last-bit
    difference in an fp32 master can flip its bf16 copy, so rel 1e-3 over 4 steps."""
    from myriad.engine.placement import MARGIN, MARGIN_FLOOR, MB

    reduce = {"reduce_dtype": "bfloat16"}
    ref, probe = _cuda_run(**reduce, device_budget_mb=4096)
    assert probe["evictions"] == 0 and probe["host_chunks"] == 0
    nonmodel = probe["nonmodel_peak_bytes"]
    budget = nonmodel + max(int(nonmodel * MARGIN) + 1, MARGIN_FLOOR) + int(0.3 * MB)
    losses, report = _cuda_run(**reduce, device_budget_mb=budget / MB)
    assert losses == pytest.approx(ref, rel=1e-3)
    assert report["evictions"] > 0 and report["host_chunks"] > 0 and report["host_pinned"]
    assert report["dtypes"] == {(torch.float32, torch.bfloat16)}
    assert 0 < report["peak_device_bytes"] <= report["budget_bytes"]


def test_bf16_gradient_shards_serve_the_gathers_between_steps(runs):
    """bf16 gradients and parameters: after each step the gradient shards hold the bf16
    parameters and later gathers read them (exactly: the losses above match the reference);
    with an fp32 gradient shard there is nothing to read."""
    ranks, _ = runs
    for r in ranks:
        assert r["bf16"]["report"]["gathers_from_grad"] == 0
        assert r["bf16_reduce_bf16"]["report"]["gathers_from_grad"] > 0
        assert r["bf16_offload"]["report"]["gathers_from_grad"] > 0
