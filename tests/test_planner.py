"""The planner: hand-counted arithmetic, saved-tensor and allocator measurements, cluster specs.

The memory estimate is checked against the peak the CPU allocator really reaches over a training
step (``torch.profiler`` memory events), on several small models, within 15 %.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from myriad.cli import main
from myriad.config import load_recipe
from myriad.engine.cluster import GB, load_cluster, shipped_clusters
from myriad.engine.planner import (
    ADAM_PARAMS_PER_S_PER_CORE,
    MFU,
    Geometry,
    Precision,
    block_activations,
    device_memory,
    expert_parallel_degree,
    head_activations,
    layer_params,
    make_plan,
    precision_for,
    step_time,
)
from myriad.errors import UserError
from myriad.model import MoEFeedForward, MoETransformerLM, count_parameters
from myriad.model.config import ModelConfig, MoEConfig
from myriad.model.flops import forward_flops

FP32_CPU = precision_for("fp32", "cpu")


def small(**kw) -> ModelConfig:
    moe = MoEConfig(
        num_experts=kw.pop("E", 4),
        top_k=2,
        d_expert=kw.pop("Fe", 4),
        every=2,
        num_shared_experts=kw.pop("shared", 0),
    )
    base = dict(vocab_size=32, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_seq_len=16)
    return ModelConfig(**{**base, **kw}, moe=moe)


def test_activation_bytes_match_a_hand_count():
    # T = 2 x 4 = 8 tokens, D 8, H 2 (MHA), F 16, E 4, K 2 (R = 16 rows), Fe 4; fp32 on the CPU.
    cfg, geo = small(objective="mlm"), Geometry(2, 4, 1, 3)
    # attention: x, normed, q and k before rotary (4*T*D = 256 each), rsqrt (4*T = 32),
    # logsumexp (4*T*H = 64); q, k, v, output, reshaped output (256 each) = 2400
    attention = 4 * 256 + 32 + 64 + 5 * 256
    ffn_norm = 256 + 256 + 32
    dense = ffn_norm + 4 * (4 * 8 * 16)  # gate, silu, up, product: 4 x T x F x 4 B
    # router: logits + probs (4*T*E = 128 each), top-k weights and ids (16*T*K), sums (16*T);
    # experts: rows in and out (4*R*D = 512 each), gate|up (4*R*2Fe = 512), silu + product (512)
    moe = ffn_norm + (2 * 128 + 256 + 128) + (512 + 512 + 512 + 512)
    assert sum(block_activations(cfg, 0, geo, FP32_CPU)) == attention + dense == 4992
    assert sum(block_activations(cfg, 1, geo, FP32_CPU)) == attention + moe == 5632
    # head: final norm in/out (8*T*D), rsqrt, head input (4*N*D), log-probs (4*N*V), N indices
    saved, fwd, bwd = head_activations(cfg, geo, FP32_CPU)
    assert saved == 8 * 64 + 32 + 4 * 3 * 8 + 4 * 3 * 32 + 9 * 3 == 1051
    assert (fwd, bwd) == (4 * 3 * 32, 8 * 3 * 32)  # logits; grads of log-probs and logits


def test_layer_params_add_up_to_the_model():
    cfg = small(shared=1)
    model = MoETransformerLM(cfg)
    blocks = layer_params(cfg)
    for (dense, experts), block in zip(blocks, model.blocks, strict=True):
        assert dense + experts == sum(p.numel() for p in block.parameters())
    counts = count_parameters(cfg)
    assert sum(d + e for d, e in blocks) + counts.embedding + cfg.d_model == counts.total


def test_single_gpu_fp32_states_are_16_bytes_per_parameter():
    cfg = small()
    total = count_parameters(cfg).total
    mem = device_memory(cfg, Geometry(2, 4, 1, 3), FP32_CPU, "none", 1)
    assert (mem.params, mem.grads, mem.optimizer) == (4 * total, 4 * total, 8 * total)
    assert mem.host_per_gpu == 0


def test_zero3_partitioning_and_expert_parallelism_at_scale():
    cfg = load_recipe("hunyuan-1t").model
    total = count_parameters(cfg).total
    geo, bf16 = Geometry(1, 2048, 1, 307), precision_for("auto", "cuda")
    # EP groups must tile the GPUs and split the experts evenly, as the engine's do: gcd(E, n)
    assert expert_parallel_degree(1536, 1024) == 512
    assert expert_parallel_degree(1536, 768) == 768 and expert_parallel_degree(8, 12) == 4
    assert expert_parallel_degree(1536, 1024, size=8) == 8  # engine.expert_parallel_size
    assert expert_parallel_degree(1536, 1024, size=3) == 512  # 3 does not tile 1,024 GPUs
    none = device_memory(cfg, geo, bf16, "none", 1024)
    assert none.optimizer == math.ceil(total / 1024) * 12  # fp32 master + two Adam moments
    full = device_memory(cfg, geo, bf16, "full", 1024)
    assert full.optimizer == 0 and full.host_per_gpu == math.ceil(total / 1024) * 14
    # full offload keeps only the layers in flight: 2 gathered bf16 copies + 1 gradient of the
    # largest. Candidates: a dense block (q, o 4096^2 each, k, v 4096 x 1024 each, 2 norms,
    # SwiGLU 3 x 4096 x 16384), an MoE block with its 1536/512 = 3 local experts, the embedding.
    dense_block = 2 * 4096**2 + 2 * 4096 * 1024 + 2 * 4096 + 3 * 4096 * 16384
    moe_dense, moe_experts = layer_params(cfg)[1]
    assert dense_block > max(moe_dense + moe_experts // 512, 49152 * 4096)
    assert full.params == 2 * dense_block * 2 and full.grads == dense_block * 2


def test_step_time_arithmetic():
    spec = load_cluster("h200x1")
    cfg, geo = small(), Geometry(2, 4, 3, 6)
    bf16 = precision_for("auto", "cuda")
    total = count_parameters(cfg).total
    t = step_time(cfg, geo, bf16, spec, "optimizer", 1)
    flops = 3 * forward_flops(cfg, 4, labelled_positions=3).total * 2 * 3
    assert t.compute == pytest.approx(flops / (989e12 * MFU), rel=1e-12)
    assert t.gpu_traffic == 0  # one GPU, one expert-parallel rank: nothing to exchange
    assert t.pcie == pytest.approx(total * 2 / (64 * GB), rel=1e-12)  # bf16 grads out, params in
    assert t.cpu_adam == pytest.approx(total / (16 * ADAM_PARAMS_PER_S_PER_CORE), rel=1e-12)
    # the CPU Adam overlaps the next step's first forward: a third of one of 3 micro-batches
    assert t.first_forward == pytest.approx(t.compute / 9, rel=1e-12)
    hidden = min(t.cpu_adam, t.compute / 9)
    assert t.total == pytest.approx(max(t.compute, t.pcie) + t.cpu_adam - hidden, rel=1e-12)


def test_saved_tensors_match_the_count():
    """What autograd really saves in a forward pass (unique storages, no parameters)."""
    for kv, shared, objective in ((0, 0, "clm"), (2, 1, "mlm")):
        cfg = small(objective=objective, vocab_size=256, d_model=32, n_heads=4, n_kv_heads=kv)
        cfg.d_ff, cfg.moe.d_expert, cfg.moe.num_shared_experts = 64, 32, shared
        model = _cpu_model(cfg)
        ids_BS, labels_BS, predicted = _batch(cfg, 2, 16)
        fixed = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        seen: dict[int, int] = {}

        def pack(t, seen=seen, fixed=fixed):
            storage = t.untyped_storage()
            if storage.data_ptr() not in fixed:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids_BS, labels_BS)
        geo = Geometry(2, 16, 1, predicted)
        counted = sum(sum(block_activations(cfg, i, geo, FP32_CPU)) for i in range(2))
        counted += head_activations(cfg, geo, FP32_CPU)[0]
        assert counted == pytest.approx(sum(seen.values()), rel=0.03)


def _cpu_model(cfg: ModelConfig) -> MoETransformerLM:
    """The GPU path's exact row layout (grouped, R = T*K rows); no cached CPU grad buffers."""
    model = MoETransformerLM(cfg)
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            module.dispatch_strategy = "grouped"
            module.reuse_cpu_grad_buffers = False
    return model


def _batch(cfg: ModelConfig, B: int, S: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    ids_BS = torch.randint(0, cfg.vocab_size, (B, S))
    labels_BS = ids_BS.clone()
    if cfg.objective == "clm":
        return ids_BS, labels_BS, B * (S - 1)
    chosen_BS = torch.rand(B, S) < 0.15
    labels_BS[~chosen_BS] = -100
    return ids_BS, labels_BS, int(chosen_BS.sum())


def measured_peak(cfg: ModelConfig, B: int, S: int, recompute: bool = False) -> tuple[int, int]:
    """(peak bytes the CPU allocator holds over the 2nd AdamW step, predicted positions).

    Before the step the live model states are exactly the parameters and AdamW's state; the
    profiler's allocation/free events over the step give the rise above them. ``recompute``:
    with activation checkpointing.
    """
    model = _cpu_model(cfg)
    model.checkpoint_blocks = recompute
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids_BS, labels_BS, predicted = _batch(cfg, B, S)

    def step() -> None:
        model(ids_BS, labels_BS).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates the Adam moments
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == "CPU"
    ]
    live = rise = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        rise = max(rise, live)
    states = sum(p.numel() * p.element_size() for p in model.parameters())
    states += sum(t.nbytes for s in optimizer.state.values() for t in s.values())
    return states + rise, predicted


@pytest.mark.parametrize(
    "shape",
    [
        # activation-dominated causal LM, tied embeddings
        dict(objective="clm", B=8, S=64, vocab_size=512, d_model=64, n_heads=4, d_ff=256, Fe=128),
        # masked LM, grouped-query attention, a shared expert, untied embeddings
        dict(objective="mlm", B=8, S=64, vocab_size=2048, d_model=64, n_heads=4, n_kv_heads=2,
             d_ff=256, Fe=128, shared=1, tie_embeddings=False),
        # model states dominate: big vocabulary, 16 wide experts, short batch
        dict(objective="clm", B=2, S=32, vocab_size=4096, d_model=128, n_heads=4, d_ff=512,
             E=16, Fe=256),
    ],
)  # fmt: skip
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
def test_memory_estimate_matches_the_measured_peak(shape, recompute):
    shape = dict(shape)
    B, S = shape.pop("B"), shape.pop("S")
    cfg = small(n_layers=4, max_seq_len=S, **shape)
    torch.manual_seed(0)
    peak, predicted = measured_peak(cfg, B, S, recompute)
    geo = Geometry(B, S, 1, predicted, recompute)
    estimate = device_memory(cfg, geo, FP32_CPU, "none", 1)
    assert estimate.peak == pytest.approx(peak, rel=0.15)


def test_every_shipped_spec_loads_and_hunyuan_plans():
    assert {"h200x1", "h100x8", "a100-40x16"} <= set(shipped_clusters())
    for name in shipped_clusters():
        spec = load_cluster(name)
        assert spec.num_gpus >= 1 and spec.gpu.memory_gib > 0
    plan = make_plan(load_recipe("hunyuan-1t"), load_cluster("h100x8"))
    full = plan.smallest["full"]
    assert full is not None and full.memory.n_gpus % 8 == 0  # whole DGX nodes
    assert full.memory.peak <= 0.9 * 80 * 2**30
    assert all(not m.peak <= 0.9 * 80 * 2**30 for m in plan.memory.values())  # 1 node: no
    assert full.memory.expert_parallel == math.gcd(1536, full.memory.n_gpus)
    keys = ["engine.expert_parallel=true", "engine.expert_parallel_size=2"]
    pinned = make_plan(load_recipe("hunyuan-1t", keys), plan.spec)  # 8 GPUs: EP 8 by default
    assert all(m.expert_parallel == 2 for m in pinned.memory.values())  # the recipe's EP groups
    assert pinned.memory["none"].peak > plan.memory["none"].peak  # 768 experts a GPU, not 192


def test_cli_plan_prints_every_mode(capsys):
    assert main(["plan", "--recipe", "hunyuan-1t", "--cluster", "a100-40x16"]) == 0
    out = capsys.readouterr().out
    for text in ("no offload", "optimizer offload", "full offload", "host bytes per parameter"):
        assert text in out
    assert "smallest cluster" in out and "nodes)" in out


SPEC = """description = "test"
nodes = 1
[gpu]
name = "G"
memory_gib = 80
bf16_tflops = 989
[node]
gpus = 8
host_memory_gib = 1024
cpu_cores = 64
pcie_gbytes_per_s = 64
gpu_link_gbytes_per_s = 450
network_gbytes_per_s = 400
"""


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("cpu_cores = 64\n", ""), "missing key 'node.cpu_cores'"),
        (("gpus = 8\n", "gpus = 8\nnvlink = 1\n"), "unknown key 'node.nvlink'"),
        (("memory_gib = 80", 'memory_gib = "80"'), "gpu.memory_gib must be float"),
        (("pcie_gbytes_per_s = 64", "pcie_gbytes_per_s = 0"), "node.pcie_gbytes_per_s must be > 0"),
        (("nodes = 1", "nodes = 2\nnodes = 3"), "not valid TOML"),
        (("network_gbytes_per_s = 400", "network_gbytes_per_s = 0\n[x]"), "unknown key 'x'"),
    ],
)
def test_bad_cluster_specs_are_one_line_user_errors(tmp_path, edit, message, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(SPEC.replace(*edit))
    with pytest.raises(UserError) as err:
        load_cluster(str(path))
    assert message in str(err.value) and str(path) in str(err.value)
    assert main(["plan", "--cluster", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_multi_node_spec_needs_a_network(tmp_path):
    path = tmp_path / "island.toml"
    path.write_text(SPEC.replace("nodes = 1", "nodes = 2").replace("= 400", "= 0"))
    with pytest.raises(UserError, match="network_gbytes_per_s is 0 but nodes = 2"):
        load_cluster(str(path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "shape",
    [
        dict(objective="clm", B=4, S=1024, vocab_size=32000, d_model=1024, n_heads=16,
             n_kv_heads=4, d_ff=4096, E=16, Fe=1024, n_layers=8),
        dict(objective="mlm", B=32, S=512, vocab_size=21128, d_model=768, n_heads=12,
             d_ff=3072, E=64, Fe=768, shared=1, n_layers=12),  # the base recipe
    ],
)  # fmt: skip
def test_bf16_estimate_matches_the_cuda_peak(shape):
    """The trainer on a GPU: fp32 weights and AdamW, bf16 autocast; peak from the allocator.

    The trainer's autocast keeps a bf16 copy of every matmul weight from forward to backward;
    the planner's engines hold bf16 working weights instead, so the test adds those copies.
    """
    B, S = shape.pop("B"), shape.pop("S")
    cfg = small(max_seq_len=S, **shape)
    torch.manual_seed(0)
    model = MoETransformerLM(cfg).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids_BS, labels_BS, predicted = _batch(cfg, B, S)
    ids_BS, labels_BS = ids_BS.cuda(), labels_BS.cuda()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids_BS, labels_BS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - ids_BS.nbytes - labels_BS.nbytes
    trainer = Precision(weight=4, act=2, keeps_expert_acts=False)  # fp32 states, bf16 compute
    estimate = device_memory(cfg, Geometry(B, S, 1, predicted), trainer, "none", 1).peak
    casts = sum(p.numel() for p in model.parameters() if p.dim() >= 2) * 2
    casts -= sum(b.ffn.router.weight.numel() for b in model.blocks if b.is_moe) * 2  # fp32
    print(f"cuda peak {peak / 2**30:.3f} GiB, estimate {(estimate + casts) / 2**30:.3f} GiB")
    assert estimate + casts == pytest.approx(peak, rel=0.15)
