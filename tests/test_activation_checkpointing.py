"""Activation checkpointing (``train.activation_checkpointing``): each block keeps only its
inputs and recomputes its forward in the backward.

Against the same model without it, the loss and every gradient are bit-identical (the same
arithmetic, replayed) while the bytes autograd saves during the forward more than halve: for a
masked-LM MoE with a shared expert, a causal LM whose attention-weight-reuse layers take
probabilities across block boundaries, and a dense model. Evaluation and no-grad forwards do
not checkpoint. Through the trainer on 2 ranks (``myriad`` with partitioning, EP and offload,
whose recomputed blocks gather their chunks again, and ``fsdp2``) it gives the reference's
losses: ``test_engine_trainer.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_attention_reuse import small

import myriad.model.transformer as transformer
from myriad.model import MoETransformerLM

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = small().moe
CONFIGS = {
    "mlm-moe-shared": dataclasses.replace(
        small(every=0), objective="mlm", moe=dataclasses.replace(MOE, num_shared_experts=1)
    ),
    "clm-attn-reuse": dataclasses.replace(small(every=2, p=0.5), objective="clm"),
    "dense": dataclasses.replace(small(every=0), moe=dataclasses.replace(MOE, every=0)),
}


def _run(cfg, recompute: bool):
    """Loss, gradients and the bytes autograd saved in one training forward."""
    torch.manual_seed(0)
    model = MoETransformerLM(cfg)
    model.checkpoint_blocks = recompute
    ids = torch.randint(0, cfg.vocab_size, (3, cfg.max_seq_len))
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels_BS=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, saved[0]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_loss_and_gradients_with_less_saved(name):
    loss, grads, saved = _run(CONFIGS[name], recompute=False)
    loss_ck, grads_ck, saved_ck = _run(CONFIGS[name], recompute=True)
    assert torch.equal(loss_ck, loss)
    assert grads_ck.keys() == grads.keys() and grads
    for n, g in grads.items():
        assert torch.equal(grads_ck[n], g), n
    assert saved_ck < saved / 2, (saved_ck, saved)


def test_only_training_forwards_checkpoint(monkeypatch):
    model = MoETransformerLM(CONFIGS["dense"])
    model.checkpoint_blocks = True
    ids = torch.zeros(1, 4, dtype=torch.long)
    calls = []
    real = transformer.checkpoint
    monkeypatch.setattr(transformer, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.eval()
    model(ids)
    model.train()
    with torch.no_grad():
        model(ids)
    assert calls == []
    model(ids)
    assert len(calls) == model.cfg.n_layers
