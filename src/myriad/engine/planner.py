"""``myriad plan``: per-GPU memory, host memory, step time and the smallest cluster for a recipe.

The model states follow ZeRO-3 partitioning across all ``n`` GPUs (each GPU owns 1/n of every
parameter, gradient and optimizer state) with the experts of each MoE layer split across GPUs by
expert parallelism (degree: the largest divisor of E that is at most n). Three modes:

- ``none``: everything on the GPU;
- ``optimizer``: fp32 master weights and Adam moments in host RAM, CPU Adam; gradients stream
  to the host as they are produced;
- ``full``: parameters, gradients and optimizer states in host RAM; the GPU holds only the
  layers in flight (PatrickStar / AngelPTM chunks).

Activations are counted by listing, for this repository's model code, every tensor each op saves
for the backward pass (``block_activations``); the backward sweep (``dynamic_peak``) frees them
layer by layer while gradients appear, which is why the peak is less than the sum of the parts.

Shape legend: B sequences per micro-batch, S sequence, T = B*S tokens, N predicted positions,
D model dim, Dkv key/value width, H heads, F dense FFN hidden, Fe expert hidden, Fs shared-expert
hidden, E experts, K top-k, R = T*K expert rows, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from myriad.config import RunConfig
from myriad.engine.cluster import GB, GIB, ClusterSpec
from myriad.model import count_parameters
from myriad.model.config import ModelConfig
from myriad.model.flops import forward_flops

MODES = ("none", "optimizer", "full")
MODE_TITLES = {"none": "no offload", "optimizer": "optimizer offload", "full": "full offload"}
# Stated assumptions (docs/planner.md says where each comes from).
MFU = 0.40  # model FLOPs utilisation: Megatron-Core reaches up to 47 % on H100 for dense GPTs
USABLE_FRACTION = 0.90  # of GPU and host memory: CUDA context, allocator slack, OS, data loader
PREFETCH_LAYERS = 2  # gathered layers in flight: the one computing and the one prefetched
ADAM_PARAMS_PER_S_PER_CORE = 4.5e9 / 16  # fused CPU AdamW, 4.5 G params/s on 16 H200-host cores
MAX_NODES = 4096


@dataclass(frozen=True)
class Precision:
    """Bytes of the tensors the plan counts.

    ``weight``: a working parameter or gradient (2 under bf16 mixed precision, 4 in fp32);
    ``act``: a matmul input or output saved for backward; norms, rotary, router and loss stay
    fp32 (4) either way. Optimizer: fp32 Adam moments (8) plus fp32 master weights (4) when the
    working weights are bf16. ``keeps_expert_acts``: the CPU expert SwiGLU saves silu(gate) and
    the product instead of recomputing them (``moe_dispatch.SAVE_ACTIVATIONS_ON_CPU``).
    """

    weight: int
    act: int
    keeps_expert_acts: bool

    @property
    def optimizer(self) -> int:
        return 8 + (4 if self.weight < 4 else 0)

    @property
    def host(self) -> int:
        """Host bytes per parameter when offloaded: master + moments + one weight-sized chunk.

        The chunk holds the working parameters and, once a layer's backward is done, its
        gradients in the same memory (PatrickStar's trick); in fp32 the parameters are the
        master weights, so the gradients need their own 4 bytes.
        """
        return 12 + self.weight


def precision_for(precision: str, device: str) -> Precision:
    """The recipe's ``train.precision`` on ``device`` ("cuda" or "cpu"), as the trainer runs it."""
    bf16 = precision == "bf16" or (precision == "auto" and device == "cuda")
    size = 2 if bf16 else 4
    return Precision(weight=size, act=size, keeps_expert_acts=device == "cpu")


@dataclass(frozen=True)
class Geometry:
    """One GPU's share of a step: ``micro_batches`` micro-batches of B x S tokens."""

    batch: int
    seq_len: int
    micro_batches: int
    predicted: int  # N: positions the LM head and the loss run on, per micro-batch
    recompute: bool = False  # activation checkpointing: blocks keep their inputs only

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def geometry_of(cfg: RunConfig, predicted: int | None = None) -> Geometry:
    """The recipe's micro-batch per GPU; masked-LM predicts ``mask_prob`` of the tokens."""
    B, S = cfg.train.batch_size, cfg.data.seq_len
    if predicted is None:
        clm = cfg.model.objective == "clm"
        predicted = B * (S - 1) if clm else round(B * S * cfg.data.mask_prob)
    return Geometry(B, S, cfg.train.grad_accum, predicted, cfg.train.activation_checkpointing)


def _attention_saved(m: ModelConfig, geo: Geometry, p: Precision) -> list[int]:
    T, D, H = geo.tokens, m.d_model, m.n_heads
    G = m.n_kv_heads or H
    Dkv = G * (D // H)
    fp32 = [4 * T * D, 4 * T * D, 4 * T, 4 * T * D, 4 * T * Dkv, 4 * T * H]  # x, normed, rsqrt,
    # q and k before rotary (fp32 copies under bf16), logsumexp of the attention kernel
    casts = [p.act * T * D] * 3 if p.act < 4 else []  # the q/k/v projections' input casts
    acts = [p.act * T * D, p.act * T * Dkv, p.act * T * Dkv, p.act * T * D, p.act * T * D]
    # q, k, v, attention out, its reshaped copy; GQA: repeat_interleave keeps k and v, and the
    # attention kernel saves the repeated copies.
    repeated = [p.act * T * D] * 2 if G < H else []
    return fp32 + casts + acts + repeated


def _ffn_saved(m: ModelConfig, index: int, geo: Geometry, p: Precision) -> list[int]:
    T, D, b = geo.tokens, m.d_model, p.act
    norm = [4 * T * D, 4 * T * D, 4 * T]
    casts = [b * T * D] * 2 if b < 4 else []
    if not m.is_moe_layer(index):
        return norm + casts + [b * T * m.d_ff] * 4  # gate, silu(gate), up, product
    moe = m.moe
    R, Fe, E, K = T * moe.top_k, moe.d_expert, moe.num_experts, moe.top_k
    router = [4 * T * E, 4 * T * E, 16 * T * K, 16 * T]  # logits, probs, weights+ids, sums
    experts = [b * R * D, b * R * 2 * Fe, b * R * D]  # rows in, gate|up, rows out
    if p.keeps_expert_acts:
        experts += [b * R * Fe, b * R * Fe]  # silu(gate) and the product
    shared = []
    if moe.num_shared_experts:
        shared = casts + [b * T * Fe * moe.num_shared_experts] * 4
    return norm + router + experts + shared


def block_activations(m: ModelConfig, index: int, geo: Geometry, p: Precision) -> list[int]:
    """Bytes of every tensor block ``index`` saves for backward over one micro-batch."""
    return _attention_saved(m, geo, p) + _ffn_saved(m, index, geo, p)


def block_backward_transient(m: ModelConfig, index: int, geo: Geometry, p: Precision) -> int:
    """Bytes of gradient temporaries at the worst moment of block ``index``'s backward.

    The FFN's dominates: the residual's gradient plus, for a dense SwiGLU, the gradients of the
    product, silu(gate) and up; for the experts, the rows' gradient in and out, the product's
    and the gate|up buffer's. Attention: the output's and q/k/v's gradients.
    """
    T, D, b = geo.tokens, m.d_model, p.act
    G = m.n_kv_heads or m.n_heads
    attn = b * T * (2 * D + 2 * G * (D // m.n_heads))
    if m.is_moe_layer(index):
        R, Fe = T * m.moe.top_k, m.moe.d_expert
        ffn = b * (2 * R * D + 3 * R * Fe)
    else:
        ffn = 3 * b * T * m.d_ff
    return 4 * T * D + max(attn, ffn)


def head_activations(m: ModelConfig, geo: Geometry, p: Precision) -> tuple[int, int, int]:
    """(saved, forward transient, backward transient) bytes of the final norm, LM head and loss.

    Saved: the final norm's input and output, the head's input and the log-softmax output.
    Forward transient: the logits (plus their fp32 copy under bf16). Backward: the gradients
    of the log-probabilities and of the logits (plus the bf16 cast of the latter).
    """
    T, D, N, V, b = geo.tokens, m.d_model, geo.predicted, m.vocab_size, p.act
    saved = 8 * T * D + 4 * T + b * N * D + 4 * N * V + 9 * N
    forward = b * N * V + (4 * N * V if b < 4 else 0)
    backward = 8 * N * V + (b * N * V if b < 4 else 0)
    return saved, forward, backward


def layer_params(m: ModelConfig) -> list[tuple[int, int]]:
    """(non-expert, routed-expert) parameter counts of each block, via ``count_parameters``.

    A one-layer copy of the config without vocabulary counts one dense or one MoE block (plus
    the final norm's D, subtracted), so the split follows ``count_parameters`` exactly.
    """
    kinds = {}
    for is_moe in (False, True):
        moe = replace(m.moe, every=1 if is_moe else 0)
        c = count_parameters(replace(m, n_layers=1, vocab_size=0, moe=moe))
        kinds[is_moe] = (c.total - m.d_model - c.experts, c.experts)
    return [kinds[m.is_moe_layer(i)] for i in range(m.n_layers)]


def expert_parallel_degree(num_experts: int, n_gpus: int, size: int = 0) -> int:
    """Ranks per expert-parallel group as the engine forms them: ``size``
    (``engine.expert_parallel_size``) where it divides both E and n, else the largest number
    that does, gcd(E, n): experts split evenly, none in two, groups tiling the GPUs."""
    if size > 0 and n_gpus % size == 0 and num_experts % size == 0:
        return size
    return math.gcd(num_experts, n_gpus)


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes on one GPU, and on the host for that GPU, in one mode at one cluster size."""

    mode: str
    n_gpus: int
    expert_parallel: int
    params: int  # resident shard plus the gathered layers in flight
    grads: int  # resident shard plus the unsharded gradients of the layer in flight
    optimizer: int
    activations: int  # saved for backward by one micro-batch, plus the loss's transient
    peak: int  # the backward sweep's maximum: less than the sum, activations die as grads appear
    host_per_gpu: int


def dynamic_peak(
    acts_L: list[int],
    transient_L: list[int],
    grads_L: list[int],
    head: tuple[int, int, int],
    embed_grad: tuple[int, int],
    g0: int,
    recomputed_L: list[int] | None = None,
) -> int:
    """Most bytes of activations plus gradients alive at once over forward and backward.

    Forward ends with every block's saved tensors plus the loss's; backward runs the head (its
    weight gradient ``embed_grad[0]`` appears), then the blocks in reverse, each holding its
    gradient temporaries and new weight gradients before its saved tensors are freed; last the
    embedding's dense gradient ``embed_grad[1]`` (twice that for tied weights: the two
    contributions and their sum coexist). ``g0``: gradients kept from earlier micro-batches.
    ``recomputed_L``: with activation checkpointing, what each block's backward recomputes
    beyond its saved input (``acts_L`` then holds the inputs).
    """
    head_saved, head_fwd, head_bwd = head
    acts = sum(acts_L) + head_saved
    points = [g0 + acts + head_fwd, g0 + acts + head_bwd + embed_grad[0]]
    grads = g0 + embed_grad[0]
    acts -= head_saved
    recomputed_L = recomputed_L or [0] * len(acts_L)
    layers = zip(acts_L, transient_L, grads_L, recomputed_L, strict=True)
    for a, t, g, r in reversed(list(layers)):
        points.append(acts + grads + t + g + r)
        acts, grads = acts - a, grads + g
    points.append(grads + embed_grad[1])
    return max(points)


def device_memory(
    m: ModelConfig, geo: Geometry, p: Precision, mode: str, n: int, ep_size: int = 0
) -> DeviceMemory:
    """Per-GPU memory of ``mode`` on ``n`` GPUs (ZeRO-3 partitioning plus expert parallelism in
    groups of ``ep_size``, see :func:`expert_parallel_degree`)."""
    counts = count_parameters(m)
    blocks = layer_params(m)
    ep = expert_parallel_degree(m.moe.num_experts, n, ep_size) if counts.experts else 1
    # A layer is gathered (all-gathered or paged in) unless this GPU already holds all of it.
    gather_dense = n > 1 or mode == "full"
    gather_experts = ep < n or mode == "full"

    def gathered(dense: int, experts: int) -> int:
        return dense * gather_dense + experts // ep * gather_experts

    work = max([gathered(d, e) for d, e in blocks] + [gathered(counts.embedding, 0)])
    in_flight = (PREFETCH_LAYERS * work * p.weight, work * p.weight)
    share = -(-counts.total // n)
    resident = share * p.weight if mode != "full" else 0
    optimizer = share * p.optimizer if mode == "none" else 0
    on_gpu = mode == "none"  # other modes stream gradients out as the layers finish
    grads_L = [-(-(d + e) // n) * p.weight * on_gpu for d, e in blocks]
    table = -(-m.vocab_size * m.d_model // n) * p.weight * on_gpu  # one V x D matrix
    embed_grad = (table, 2 * table if m.tie_embeddings else table)
    acts_L = [sum(block_activations(m, i, geo, p)) for i in range(m.n_layers)]
    recomputed_L = None
    if geo.recompute:  # a block keeps its fp32 input; its backward recomputes the rest
        block_input = 4 * geo.tokens * m.d_model
        recomputed_L = [a - block_input for a in acts_L]
        acts_L = [block_input] * m.n_layers
    transient_L = [block_backward_transient(m, i, geo, p) for i in range(m.n_layers)]
    head = head_activations(m, geo, p)
    g0 = share * p.weight * on_gpu if geo.micro_batches > 1 else 0
    dynamic = dynamic_peak(acts_L, transient_L, grads_L, head, embed_grad, g0, recomputed_L)
    return DeviceMemory(
        mode=mode,
        n_gpus=n,
        expert_parallel=ep,
        params=resident + in_flight[0],
        grads=share * p.weight * on_gpu + in_flight[1],
        optimizer=optimizer,
        activations=sum(acts_L) + head[0] + max(head[1], head[2]),
        peak=resident + optimizer + sum(in_flight) + dynamic,
        host_per_gpu=share * p.host if mode != "none" else 0,
    )


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step on one GPU. Transfers overlap compute; the CPU Adam overlaps
    only the next step's first forward (``engine.overlap_step``), which must wait for it."""

    compute: float
    gpu_traffic: float  # ZeRO-3 gathers and reduce-scatters, expert all-to-all
    pcie: float  # host <-> GPU, the busier direction
    cpu_adam: float
    first_forward: float = 0.0  # compute of one micro-batch's forward: a third of 1/accum

    @property
    def total(self) -> float:
        busy = max(self.compute, self.gpu_traffic, self.pcie)
        return busy + max(self.cpu_adam - self.first_forward, 0.0)


def _collective_bandwidth(spec: ClusterSpec, n: int) -> float:
    """Bytes/s one GPU gets in a collective: NVLink inside a node, else its share of the NICs."""
    link = spec.node.gpu_link_gbytes_per_s * GB
    if n <= spec.node.gpus:
        return link
    return min(link, spec.node.network_gbytes_per_s * GB / spec.node.gpus)


def step_time(
    m: ModelConfig,
    geo: Geometry,
    p: Precision,
    spec: ClusterSpec,
    mode: str,
    n: int,
    ep_size: int = 0,
) -> StepTime:
    """Compute at ``MFU`` of the bf16 peak, plus the traffic each mode adds (ring collectives)."""
    per_seq = forward_flops(m, geo.seq_len, labelled_positions=geo.predicted / geo.batch)
    passes = 4 if geo.recompute else 3  # backward = 2 x forward, plus the recomputed forward
    flops = passes * per_seq.total * geo.batch * geo.micro_batches
    compute = flops / (spec.gpu.bf16_tflops * 1e12 * MFU)
    counts = count_parameters(m)
    ep = expert_parallel_degree(m.moe.num_experts, n, ep_size) if counts.experts else 1
    dense, replicas = counts.total - counts.experts, n // ep
    traffic = 3 * dense * p.weight * (n - 1) / n  # gather forward and backward, reduce-scatter
    traffic += 3 * counts.experts / ep * p.weight * (replicas - 1) / replicas
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    rows = geo.tokens * m.moe.top_k
    traffic += 4 * moe_layers * rows * m.d_model * p.act * (ep - 1) / ep  # 2 all-to-all each way
    gpu_traffic = traffic * geo.micro_batches / _collective_bandwidth(spec, n)
    share = counts.total / n
    pcie_bytes = {"none": 0.0, "optimizer": share * p.weight}
    pcie_bytes["full"] = 2 * share * p.weight * geo.micro_batches  # uploads forward and backward
    pcie = pcie_bytes[mode] / (spec.node.pcie_gbytes_per_s * GB)
    gpus_here = min(n, spec.node.gpus)
    adam_rate = spec.node.cpu_cores * ADAM_PARAMS_PER_S_PER_CORE
    cpu_adam = 0.0 if mode == "none" else share * gpus_here / adam_rate
    return StepTime(compute, gpu_traffic, pcie, cpu_adam, compute / (passes * geo.micro_batches))


def fits(mem: DeviceMemory, spec: ClusterSpec) -> bool:
    """Whether the peak fits the usable GPU memory and the node's GPUs' host share its RAM."""
    host_per_node = mem.host_per_gpu * min(mem.n_gpus, spec.node.gpus)
    return (
        mem.peak <= USABLE_FRACTION * spec.gpu.memory_gib * GIB
        and host_per_node <= USABLE_FRACTION * spec.node.host_memory_gib * GIB
    )


def cluster_sizes(spec: ClusterSpec) -> list[int]:
    """GPU counts of the spec's node type, smallest first: part of one node, then whole nodes."""
    gpus = spec.node.gpus
    partial = [2**k for k in range(gpus.bit_length()) if 2**k < gpus]
    max_nodes = MAX_NODES if spec.node.network_gbytes_per_s > 0 else 1
    return partial + [gpus * k for k in range(1, max_nodes + 1)]


def smallest_fit(
    m: ModelConfig, geo: Geometry, p: Precision, spec: ClusterSpec, mode: str, ep_size: int = 0
) -> DeviceMemory | None:
    """The fewest GPUs on which ``mode`` fits, or None up to ``MAX_NODES`` nodes.

    Per-GPU memory never grows with more whole nodes (shards shrink, the expert-parallel degree
    only rises), so whole nodes are bisected; partial nodes are tried in turn first.
    """
    sizes = cluster_sizes(spec)
    partial = [s for s in sizes if s < spec.node.gpus]
    for size in partial:
        mem = device_memory(m, geo, p, mode, size, ep_size)
        if fits(mem, spec):
            return mem
    whole = sizes[len(partial) :]
    lo, hi = 0, len(whole) - 1
    if not fits(device_memory(m, geo, p, mode, whole[hi], ep_size), spec):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(device_memory(m, geo, p, mode, whole[mid], ep_size), spec):
            hi = mid
        else:
            lo = mid + 1
    return device_memory(m, geo, p, mode, whole[lo], ep_size)


def smaller_micro_batches(geo: Geometry) -> list[Geometry]:
    """The recipe's geometry, then halved micro-batches with as many more of them (same step)."""

    def split(batch: int) -> Geometry:
        scale = geo.batch // batch
        micro, predicted = geo.micro_batches * scale, geo.predicted // scale
        return replace(geo, batch=batch, micro_batches=micro, predicted=predicted)

    out, batch = [geo], geo.batch
    while batch % 2 == 0:
        batch //= 2
        out.append(split(batch))
    if out[-1].batch != 1:
        out.append(split(1))
    return out


@dataclass(frozen=True)
class Fit:
    """The smallest cluster for one mode: its memory, step time and (maybe smaller) micro-batch."""

    memory: DeviceMemory
    time: StepTime
    geometry: Geometry


@dataclass(frozen=True)
class Plan:
    """Everything ``myriad plan`` prints, for the spec's own size and for the smallest fit."""

    cfg: RunConfig
    spec: ClusterSpec
    geometry: Geometry
    precision: Precision
    memory: dict[str, DeviceMemory]  # by mode, on the spec's GPUs
    time: dict[str, StepTime]
    smallest: dict[str, Fit | None]  # by mode; None: nothing fits up to MAX_NODES nodes


def make_plan(cfg: RunConfig, spec: ClusterSpec) -> Plan:
    """Memory and step time of every mode on ``spec``, and the smallest cluster that fits.

    When no cluster fits the recipe's micro-batch (its activations alone exceed a GPU), the
    search retries with smaller micro-batches and proportionally more accumulation steps.
    """
    m, geo = cfg.model, geometry_of(cfg)
    p = precision_for(cfg.train.precision, "cuda")
    n, k = spec.num_gpus, cfg.engine.expert_parallel_size  # k = 0: the planner's choice
    memory = {mode: device_memory(m, geo, p, mode, n, k) for mode in MODES}
    time = {mode: step_time(m, geo, p, spec, mode, n, k) for mode in MODES}
    smallest: dict[str, Fit | None] = {}
    for mode in MODES:
        smallest[mode] = None
        for g in smaller_micro_batches(geo):
            mem = smallest_fit(m, g, p, spec, mode, k)
            if mem is not None:
                smallest[mode] = Fit(mem, step_time(m, g, p, spec, mode, mem.n_gpus, k), g)
                break
    return Plan(cfg, spec, geo, p, memory, time, smallest)
