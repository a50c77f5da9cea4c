"""Top-k softmax router with its balancing terms; router math runs in fp32.

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from myriad.model import cpu_kernels
from myriad.model.config import MoEConfig


@dataclass
class Routing:
    """Which experts each token goes to, with what weight, and the balancing losses."""

    weights_TK: torch.Tensor  # fp32 combine weights
    expert_ids_TK: torch.Tensor  # int64
    load_balance_loss: torch.Tensor  # Switch loss, unscaled (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # mean squared log-partition of the router logits, unscaled
    counts_E: torch.Tensor  # int64 assignments per expert (before any capacity drop)


class TopKRouter(nn.Module):
    """Scores experts from the hidden state and picks the top k per token.

    With ``bias_update_rate > 0`` a per-expert bias (DeepSeek-V3's auxiliary-loss-free balancing)
    shifts which experts are *selected*, never the weights they are combined with; the trainer
    nudges it after each step through :meth:`update_bias`.
    """

    selection_bias_E: torch.Tensor

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.norm_topk = cfg.norm_topk
        self.bias_update_rate = cfg.bias_update_rate
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        self.register_buffer("selection_bias_E", torch.zeros(cfg.num_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        scores_TE = probs_TE
        if self.bias_update_rate > 0:
            scores_TE = probs_TE + self.selection_bias_E
        expert_ids_TK = _top_ids(scores_TE, self.top_k)
        weights_TK = probs_TE.gather(1, expert_ids_TK)
        if self.norm_topk and self.top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)

        num_tokens = x_TD.shape[0]
        # scatter_add, unlike bincount, needs no host sync on CUDA.
        ids_A = expert_ids_TK.flatten()
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=ids_A.device)
        counts_E.scatter_add_(0, ids_A, torch.ones_like(ids_A))
        fraction_E = counts_E.float() / max(num_tokens * self.top_k, 1)
        load_balance_loss = self.num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()
        # With the bias, the first pick need not be the most probable expert.
        top_ids_TK = None if self.bias_update_rate > 0 else expert_ids_TK
        z_loss = _log_partition(logits_TE, probs_TE, top_ids_TK).pow(2).mean()
        return Routing(weights_TK, expert_ids_TK, load_balance_loss, z_loss, counts_E)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones."""
        if self.bias_update_rate <= 0:
            return
        load_E = tokens_per_expert_E.float().to(self.selection_bias_E.device)
        self.selection_bias_E += self.bias_update_rate * torch.sign(load_E.mean() - load_E)


def _top_ids(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Each token's k highest-scoring experts, highest first. On the CPU Myriad's kernel when it
    is built: PyTorch's CPU topk took 0.8 ms of a 50 ms layer step at 64 experts."""
    small = k <= min(scores_TE.shape[1], cpu_kernels.TOPK_MAX)
    if scores_TE.device.type == "cpu" and small and cpu_kernels.available():
        return cpu_kernels.topk_ids(scores_TE, k)
    return scores_TE.topk(k, dim=-1).indices


def _log_partition(
    logits_TE: torch.Tensor, probs_TE: torch.Tensor, top_ids_TK: torch.Tensor | None
) -> torch.Tensor:
    """``logsumexp(logits)`` per token, read off the softmax instead of a second exp pass.

    For any expert j, log Z = logit_j - log p_j; at the most probable expert p_j >= 1/E, so the
    log is well conditioned. ``top_ids_TK`` (sorted top-k of the probabilities) saves the argmax.
    """
    top_T1 = probs_TE.argmax(-1, keepdim=True) if top_ids_TK is None else top_ids_TK[:, :1]
    return (logits_TE.gather(1, top_T1) - probs_TE.gather(1, top_T1).log()).squeeze(1)


def balanced_assignment(counts_V: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """Frequency-balanced bins: each token id gets ``top_k`` distinct experts, greedily.

    Tokens go in descending frequency to the ``top_k`` currently least-loaded experts (longest
    processing time first), so the final load of every expert is at most
    ``top_k * counts.sum() / (num_experts - top_k + 1) + counts.max()``: a Zipf head cannot pile
    onto one expert. Unseen ids add a tiny load so they spread too. Returns int64 (V, K),
    each row ordered by preference (its first expert is the token's top-1).
    """
    counts = counts_V.double().cpu()
    order_V = torch.sort(counts, descending=True, stable=True).indices
    load_E = torch.zeros(num_experts, dtype=torch.float64)
    ids_VK = torch.empty(counts.shape[0], top_k, dtype=torch.int64)
    tiny = 1e-6 * max(float(counts[counts > 0].min()) if bool((counts > 0).any()) else 1.0, 1e-9)
    for v in order_V.tolist():
        # stable sort keeps the lowest expert index first among equal loads: deterministic
        chosen = torch.sort(load_E, stable=True).indices[:top_k]
        ids_VK[v] = chosen
        load_E[chosen] += float(counts[v]) + tiny
    return ids_VK


class WordRouter(nn.Module):
    """Routes a token from its id alone (word-vector routing), once per batch for all MoE layers.

    The router scores experts from the RMS-normalised word vector: the model's input embedding,
    detached so routing does not pull on it (``router_input="word"``), or a separate routing
    embedding (``"routing_embedding"``). :meth:`freeze` snapshots the decision of every vocabulary
    id into a table; afterwards routing is a lookup and never changes (StableMoE's second stage).
    """

    frozen_ids_VK: torch.Tensor
    frozen_weights_VK: torch.Tensor
    frozen: torch.Tensor

    def __init__(self, vocab_size: int, d_model: int, cfg: MoEConfig, eps: float) -> None:
        super().__init__()
        self.source = cfg.router_input
        self.eps = eps
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.embed = (
            nn.Embedding(vocab_size, cfg.routing_dim)
            if self.source == "routing_embedding"
            else None
        )
        self.gate = TopKRouter(cfg.routing_dim if self.embed is not None else d_model, cfg)
        self.register_buffer("frozen_ids_VK", torch.zeros(vocab_size, cfg.top_k, dtype=torch.long))
        self.register_buffer("frozen_weights_VK", torch.zeros(vocab_size, cfg.top_k))
        self.register_buffer("frozen", torch.zeros(1, dtype=torch.bool))

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen.item())

    def _vectors(self, ids_T: torch.Tensor, word_vectors_TD: torch.Tensor) -> torch.Tensor:
        x_TD = self.embed(ids_T) if self.embed is not None else word_vectors_TD.detach()
        return F.rms_norm(x_TD.float(), (x_TD.shape[-1],), eps=self.eps)

    def forward(self, ids_T: torch.Tensor, word_vectors_TD: torch.Tensor) -> Routing:
        """Routing of tokens ``ids_T``; ``word_vectors_TD`` are their input embeddings."""
        if not self.is_frozen:
            with torch.autocast(ids_T.device.type, enabled=False):  # router math stays fp32
                return self.gate(self._vectors(ids_T, word_vectors_TD))
        expert_ids_TK = self.frozen_ids_VK[ids_T]
        weights_TK = self.frozen_weights_VK[ids_T]
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=ids_T.device)
        counts_E.scatter_add_(0, expert_ids_TK.flatten(), torch.ones_like(expert_ids_TK.flatten()))
        # Constant diagnostics once frozen (nothing left to train): the Switch formula with the
        # frozen combine weights in place of the router probabilities.
        fraction_E = counts_E.float() / max(expert_ids_TK.numel(), 1)
        mean_weight_E = torch.zeros(self.num_experts, device=ids_T.device)
        mean_weight_E.scatter_add_(0, expert_ids_TK.flatten(), weights_TK.flatten())
        mean_weight_E = mean_weight_E / max(ids_T.shape[0], 1)
        load_balance_loss = self.num_experts * (fraction_E * mean_weight_E).sum()
        zero = weights_TK.new_zeros(())
        return Routing(weights_TK, expert_ids_TK, load_balance_loss, zero, counts_E)

    @torch.no_grad()
    def freeze(self, embedding_VD: torch.Tensor) -> None:
        """Snapshot every id's experts and weights; later calls keep the first snapshot."""
        if self.is_frozen:
            return
        ids_V = torch.arange(self.frozen_ids_VK.shape[0], device=self.frozen_ids_VK.device)
        with torch.autocast(ids_V.device.type, enabled=False):
            routing = self.gate(self._vectors(ids_V, embedding_VD))
        self.frozen_ids_VK.copy_(routing.expert_ids_TK)
        self.frozen_weights_VK.copy_(routing.weights_TK)
        self.frozen.fill_(True)

    @torch.no_grad()
    def init_balanced(self, counts_V: torch.Tensor, gain: float = 0.3) -> torch.Tensor:
        """Set the routing embedding so each id's top-k is its frequency-balanced bin.

        Channel ``e`` of the first ``E`` routing channels votes for expert ``e``: an id's row holds
        ``1 - k / (2K)`` at its k-th expert's channel and 0 at the other E channels, the router
        reads those channels through ``gain * I``; the remaining channels keep their random
        init (read through zeros) so they are free to learn. Returns the (V, K) assignment.
        """
        if self.embed is None:
            raise ValueError("balanced init needs router_input='routing_embedding'")
        E, K = self.num_experts, self.top_k
        ids_VK = balanced_assignment(counts_V, E, K).to(self.embed.weight.device)
        votes_K = 1.0 - torch.arange(K, dtype=torch.float32) / (2 * K)
        table_VR = self.embed.weight
        table_VR[:, :E] = 0.0
        rows_V = torch.arange(ids_VK.shape[0], device=ids_VK.device)
        for k in range(K):
            table_VR[rows_V, ids_VK[:, k]] = float(votes_K[k])
        weight_ER = self.gate.weight
        weight_ER.zero_()
        weight_ER[:, :E] = gain * torch.eye(E, device=weight_ER.device)
        return ids_VK
