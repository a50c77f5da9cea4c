"""The MoE language model: embeddings, pre-norm blocks with dense or MoE FFNs, an LM head.

Shape legend: B batch, S sequence (queries), T sequence (keys), D model dim, V vocabulary,
N predicted positions, E experts, H heads.

Two HunYuan cost savers live here as model structure (the trainer only flips their switches):
word-vector routing (one :class:`WordRouter` decision per batch, shared by every MoE layer) and
attention-weight reuse (reuse layers apply the previous layer's attention probabilities to their
own values; in training each recomputes its own with probability p).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from myriad.model.config import ModelConfig
from myriad.model.layers import Attention, RMSNorm, SwiGLU, rotary_tables
from myriad.model.moe import MoEFeedForward, MoEOutput
from myriad.model.router import Routing, WordRouter

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    """Loss terms and per-MoE-layer statistics; ``loss`` already includes the weighted aux terms."""

    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    logits: torch.Tensor | None
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)  # one (E,) per MoE layer
    dropped_fraction: torch.Tensor | None = None
    hidden_BSD: torch.Tensor | None = None
    expert_ids: list[torch.Tensor] = field(default_factory=list)  # one (B*S, K) per MoE layer
    attn_recomputed: list[bool] = field(default_factory=list)  # per reuse layer, this forward


@dataclass
class Encoded:
    """What :meth:`MoETransformerLM.encode` returns besides the final hidden states."""

    moe_outs: list[MoEOutput]
    attn_recomputed: list[bool]


class Block(nn.Module):
    """A pre-norm block. ``attn_mode``: "sdpa"; "probs" (explicit softmax, hands the
    probabilities to the next layer, which reuses them); or "reuse" (a reuse layer)."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        reuse_layers = cfg.attn_reuse.reuse_layers(cfg.n_layers)
        self.attn_mode = "sdpa"
        if index in reuse_layers:
            self.attn_mode = "reuse"
        elif index + 1 in reuse_layers:
            self.attn_mode = "probs"
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.objective == "clm")
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        self.ffn: nn.Module = (
            MoEFeedForward(cfg.d_model, cfg.moe) if self.is_moe else SwiGLU(cfg.d_model, cfg.d_ff)
        )

    def attention(self, x_BSD, cos, sin, mask_BS, probs_BHST, reuse: bool):
        """Attention output plus the probabilities the next layer may reuse (or None)."""
        a_BSD = self.attn_norm(x_BSD)
        if self.attn_mode == "sdpa":
            return self.attn(a_BSD, cos, sin, mask_BS), None
        if reuse:
            return self.attn.forward_reuse(a_BSD, probs_BHST), probs_BHST
        return self.attn.forward_probs(a_BSD, cos, sin, mask_BS)

    def forward(
        self,
        x_BSD,
        cos,
        sin,
        mask_BS,
        routing: Routing | None = None,
        probs_BHST: torch.Tensor | None = None,
        reuse: bool = False,
    ):
        attn_BSD, probs_BHST = self.attention(x_BSD, cos, sin, mask_BS, probs_BHST, reuse)
        x_BSD = x_BSD + attn_BSD
        h_BSD = self.ffn_norm(x_BSD)
        if not self.is_moe:
            return x_BSD + self.ffn(h_BSD), None, probs_BHST
        out = self.ffn(h_BSD.reshape(-1, h_BSD.shape[-1]), routing)
        return x_BSD + out.y.view_as(x_BSD), out, probs_BHST


class MoETransformerLM(nn.Module):
    """Masked-LM encoder or causal LM; MoE FFN in every ``moe.every``-th layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.word_router = (
            WordRouter(cfg.vocab_size, cfg.d_model, cfg.moe, cfg.norm_eps)
            if cfg.shared_routing
            else None
        )
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reuse_plan = cfg.attn_reuse.inference_plan(cfg.n_layers)  # eval: reuse or compute
        # Activation checkpointing (``train.activation_checkpointing``): in training each block
        # keeps only its inputs and recomputes its forward in the backward (PyTorch's
        # non-reentrant checkpoint; the reuse layers' draws happen outside the blocks).
        self.checkpoint_blocks = False
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; output projections scaled down by depth (GPT-2)."""
        std = self.cfg.init_std
        out_std = std / (2 * self.cfg.n_layers) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "down.weight", "w_out_EFD")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def _reuse_now(self, index: int) -> bool:
        """Whether reuse layer number ``index`` reuses in this forward (else it recomputes).

        Training draws from the global torch RNG (checkpointed, so a resume repeats the draws);
        p = 0 or 1 draws nothing. Evaluation follows the recipe's fixed schedule.
        """
        if not self.training:
            return self.reuse_plan[index]
        p = self.cfg.attn_reuse.recompute_prob
        if p <= 0.0 or p >= 1.0:
            return p <= 0.0
        return bool(torch.rand(()).item() >= p)

    def encode(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None):
        """Final hidden states plus the MoE layers' outputs and the reuse decisions."""
        seq_len = input_ids_BS.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        mask_BS = attention_mask_BS.bool() if attention_mask_BS is not None else None
        x_BSD = self.embed(input_ids_BS)
        routing = None
        if self.word_router is not None:  # depends on token ids only: once for all MoE layers
            routing = self.word_router(input_ids_BS.reshape(-1), x_BSD.reshape(-1, x_BSD.shape[-1]))
        enc = Encoded([], [])
        probs_BHST = None
        for block in self.blocks:
            reuse = False
            if block.attn_mode == "reuse":
                reuse = self._reuse_now(len(enc.attn_recomputed))
                enc.attn_recomputed.append(not reuse)
            args = (x_BSD, self.rope_cos, self.rope_sin, mask_BS, routing, probs_BHST, reuse)
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                x_BSD, moe_out, probs_BHST = checkpoint(block, *args, use_reentrant=False)
            else:
                x_BSD, moe_out, probs_BHST = block(*args)
            if moe_out is not None:
                enc.moe_outs.append(moe_out)
        return self.norm(x_BSD), enc

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        labels_BS: torch.Tensor | None = None,
        attention_mask_BS: torch.Tensor | None = None,
    ) -> LMOutput:
        """With labels, the loss over positions whose label is not -100; logits only there.

        For ``clm`` labels are the input ids themselves (shifted here); for ``mlm`` they hold the
        original ids at masked positions and -100 elsewhere.
        """
        h_BSD, enc = self.encode(input_ids_BS, attention_mask_BS)
        moe_outs = enc.moe_outs
        zero = h_BSD.new_zeros((), dtype=torch.float32)
        lb, z = self.balancing_losses(enc)
        dropped = torch.stack([o.dropped_fraction for o in moe_outs]).mean() if moe_outs else zero
        stats = dict(
            load_balance_loss=lb,
            z_loss=z,
            tokens_per_expert=[o.tokens_per_expert_E for o in moe_outs],
            dropped_fraction=dropped,
            expert_ids=[o.expert_ids_TK for o in moe_outs if o.expert_ids_TK is not None],
            attn_recomputed=enc.attn_recomputed,
        )
        if labels_BS is None:
            return LMOutput(None, None, self.lm_head(h_BSD), hidden_BSD=h_BSD, **stats)
        if self.cfg.objective == "clm":
            h_BSD = h_BSD[:, :-1]
            labels_BS = labels_BS[:, 1:]
        # Project only the positions that carry a target: 15 % of them under masked-LM.
        keep = labels_BS != IGNORE_INDEX
        logits_ND = self.lm_head(h_BSD[keep])
        lm_loss = F.cross_entropy(logits_ND.float(), labels_BS[keep])
        loss = lm_loss + self.weighted_aux_loss(lb, z)
        return LMOutput(loss, lm_loss, logits_ND, hidden_BSD=None, **stats)

    def balancing_losses(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted load-balancing and z-losses summed over routers (fp32 scalars).

        A shared word router's terms are counted once, like any single router.
        """
        routers = enc.moe_outs[:1] if self.word_router is not None else enc.moe_outs
        zero = self.embed.weight.new_zeros((), dtype=torch.float32)
        lb = sum((o.load_balance_loss for o in routers), zero)
        z = sum((o.z_loss for o in routers), zero)
        return lb, z

    def weighted_aux_loss(self, lb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The auxiliary terms as they enter the training loss (recipe coefficients)."""
        return self.cfg.moe.aux_loss_coef * lb + self.cfg.moe.z_loss_coef * z

    def update_router_biases(self, tokens_per_expert: list[torch.Tensor]) -> None:
        """Apply the auxiliary-loss-free bias step to each router, given its load."""
        if self.word_router is not None:
            if tokens_per_expert and not self.word_router.is_frozen:
                self.word_router.gate.update_bias(tokens_per_expert[0])  # same in every layer
            return
        moe_layers = [b.ffn for b in self.blocks if isinstance(b.ffn, MoEFeedForward)]
        for layer, load_E in zip(moe_layers, tokens_per_expert, strict=True):
            assert layer.router is not None
            layer.router.update_bias(load_E)

    def freeze_routing(self) -> None:
        """Fix every token id's experts from now on (word-vector routing only)."""
        if self.word_router is None:
            raise ValueError("only word-vector routing (model.moe.router_input) can be frozen")
        self.word_router.freeze(self.embed.weight)

    def init_balanced_routing(self, token_counts_V: torch.Tensor) -> torch.Tensor:
        """Start from frequency-balanced expert bins for the given token counts.

        The counts come from the trainer (measured on the training batches), so the model never
        reads data itself. Returns the (V, K) expert assignment.
        """
        if self.word_router is None:
            raise ValueError("balanced routing init needs word-vector routing")
        return self.word_router.init_balanced(token_counts_V)
