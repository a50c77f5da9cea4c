"""The MoE language model: embeddings, pre-norm blocks with dense or MoE FFNs, an LM head.

Shape legend: B batch, S sequence, D model dim, V vocabulary, N predicted positions, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from myriad.model.config import ModelConfig
from myriad.model.layers import Attention, RMSNorm, SwiGLU, rotary_tables
from myriad.model.moe import MoEFeedForward

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


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.objective == "clm")
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        self.ffn: nn.Module = (
            MoEFeedForward(cfg.d_model, cfg.moe) if self.is_moe else SwiGLU(cfg.d_model, cfg.d_ff)
        )

    def forward(self, x_BSD, cos, sin, mask_BS):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, mask_BS)
        h_BSD = self.ffn_norm(x_BSD)
        if not self.is_moe:
            return x_BSD + self.ffn(h_BSD), None
        out = self.ffn(h_BSD.reshape(-1, h_BSD.shape[-1]))
        return x_BSD + out.y.view_as(x_BSD), out


class MoETransformerLM(nn.Module):
    """Masked-LM encoder or causal LM; MoE FFN in every ``moe.every``-th layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
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

    def encode(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None):
        """Final hidden states plus the MoE layers' outputs (for losses and statistics)."""
        seq_len = input_ids_BS.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        mask_BS = attention_mask_BS.bool() if attention_mask_BS is not None else None
        x_BSD = self.embed(input_ids_BS)
        moe_outs = []
        for block in self.blocks:
            x_BSD, moe_out = block(x_BSD, self.rope_cos, self.rope_sin, mask_BS)
            if moe_out is not None:
                moe_outs.append(moe_out)
        return self.norm(x_BSD), moe_outs

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
        h_BSD, moe_outs = self.encode(input_ids_BS, attention_mask_BS)
        zero = h_BSD.new_zeros((), dtype=torch.float32)
        lb = sum((o.load_balance_loss for o in moe_outs), zero)
        z = sum((o.z_loss for o in moe_outs), zero)
        dropped = torch.stack([o.dropped_fraction for o in moe_outs]).mean() if moe_outs else zero
        stats = dict(
            load_balance_loss=lb,
            z_loss=z,
            tokens_per_expert=[o.tokens_per_expert_E for o in moe_outs],
            dropped_fraction=dropped,
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
        moe = self.cfg.moe
        loss = lm_loss + moe.aux_loss_coef * lb + moe.z_loss_coef * z
        return LMOutput(loss, lm_loss, logits_ND, hidden_BSD=None, **stats)

    def update_router_biases(self, tokens_per_expert: list[torch.Tensor]) -> None:
        """Apply the auxiliary-loss-free bias step to each MoE layer, given its load."""
        moe_layers = [b.ffn for b in self.blocks if isinstance(b.ffn, MoEFeedForward)]
        for layer, load_E in zip(moe_layers, tokens_per_expert, strict=True):
            layer.router.update_bias(load_E)
