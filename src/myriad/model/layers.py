"""Dense building blocks: RMSNorm, rotary positions, attention and the SwiGLU FFN.

Shape legend: B batch, S sequence (queries), T sequence (keys), D model dim, H heads, G kv heads,
Dh head dim, F ffn hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations do not lose the scale.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (S, Dh/2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles_SDh2 = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles_SDh2.cos().float(), angles_SDh2.sin().float()


def apply_rotary(x_BHSDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) by position-dependent angles."""
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    seq_len = x_BHSDh.shape[-2]
    cos, sin = cos[:seq_len], sin[:seq_len]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x_BHSDh)


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention on ``scaled_dot_product_attention``.

    Attention-weight reuse needs the probability matrix, which SDPA never materialises, so
    :meth:`forward_probs` computes ``softmax(QK^T)`` explicitly and :meth:`forward_reuse` applies
    given probabilities to this layer's own values; :meth:`forward` (SDPA) is untouched.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, causal: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = d_model // n_heads
        self.causal = causal
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_padding_mask_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        mask = None
        if key_padding_mask_BS is not None:
            mask = key_padding_mask_BS[:, None, None, :]  # True = attend
            if self.causal:
                mask = mask & torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).tril()
        out_BHSDh = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None
        )
        return self.wo(out_BHSDh.transpose(1, 2).reshape(B, S, -1))

    def _values(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """V of every query head (kv heads repeated for GQA): (B, H, S, Dh)."""
        B, S, _ = x_BSD.shape
        v_BGSDh = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return v_BGSDh.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)

    def _output(self, probs_BHST: torch.Tensor, v_BHTDh: torch.Tensor) -> torch.Tensor:
        B, _, S, _ = probs_BHST.shape
        out_BHSDh = torch.matmul(probs_BHST.to(v_BHTDh.dtype), v_BHTDh)
        return self.wo(out_BHSDh.transpose(1, 2).reshape(B, S, -1))

    def forward_probs(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_padding_mask_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same function as :meth:`forward` via an explicit fp32 softmax; also the probs."""
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores_BHST = torch.matmul(q, k.transpose(-1, -2)).float() * self.head_dim**-0.5
        allowed = None
        if key_padding_mask_BS is not None:
            allowed = key_padding_mask_BS[:, None, None, :]  # True = attend
        if self.causal:
            causal_ST = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).tril()
            allowed = causal_ST if allowed is None else allowed & causal_ST
        if allowed is not None:
            scores_BHST = scores_BHST.masked_fill(~allowed, float("-inf"))
        probs_BHST = scores_BHST.softmax(dim=-1)
        return self._output(probs_BHST, self._values(x_BSD)), probs_BHST

    def forward_reuse(self, x_BSD: torch.Tensor, probs_BHST: torch.Tensor) -> torch.Tensor:
        """Reuse another layer's probabilities: only V, PV and the output projection run.

        The probabilities already carry that layer's padding and causal masks (same batch).
        """
        return self._output(probs_BHST, self._values(x_BSD))


class SwiGLU(nn.Module):
    """The dense feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
