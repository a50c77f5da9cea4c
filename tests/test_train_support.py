"""Shared fakes for the training tests (this module holds no tests).

``FakePrepared`` has the shape of ``myriad.data.PreparedData``: a small deterministic causal-LM
corpus (counting sequences ``a, a+1, a+2, ...`` mod V) whose loss visibly falls in a few steps.
Each batch is a pure function of (seed, position), so the stream's state is its position.
"""

from __future__ import annotations

from pathlib import Path

import torch

from myriad.config import RunConfig
from myriad.data.config import DataConfig
from myriad.model import ModelConfig, MoEConfig
from myriad.train.config import TrainConfig

VOCAB = 64
SEQ = 16


def tiny_config(**train) -> RunConfig:
    """d_model 32, 2 MoE layers of 4 experts (top-2), seq 16; a CPU step takes milliseconds."""
    model = ModelConfig(
        objective="clm",
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=SEQ,
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=32, every=1, bias_update_rate=0.01),
    )
    defaults = dict(
        steps=6,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        eval_every=2,
        eval_batches=2,
        checkpoint_every=3,
        device="cpu",
    )
    defaults.update(train)
    return RunConfig(
        name="tiny-test",
        model=model,
        data=DataConfig(corpus="fake", seq_len=SEQ),
        train=TrainConfig(**defaults),  # type: ignore[arg-type]
    )


def counting_batch(batch_size: int, seed: int, index: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    start_B1 = torch.randint(0, VOCAB, (batch_size, 1), generator=gen)
    ids_BS = (start_B1 + torch.arange(SEQ)) % VOCAB
    return {"input_ids": ids_BS, "labels": ids_BS.clone()}


class FakeStream:
    def __init__(self, batch_size: int, seed: int, fail_at: int | None = None) -> None:
        self.batch_size, self.seed, self.position, self.fail_at = batch_size, seed, 0, fail_at

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * SEQ

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.fail_at is not None and self.position == self.fail_at:
            raise KeyboardInterrupt("simulated stop")
        batch = counting_batch(self.batch_size, self.seed, self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    follow = load_state_dict  # the state holds no seed


class FakePrepared:
    def __init__(self, out_dir: Path, fail_at: int | None = None) -> None:
        self.tokenizer_path = Path(out_dir) / "tokenizer.json"
        self.tokenizer_path.write_text("{}", encoding="utf-8")
        self.vocab_size = VOCAB
        self.num_train_sequences = 1000
        self.num_heldout_sequences = 8
        self.num_tokens = 1008 * SEQ
        self.special_ids: dict[str, int] = {}
        self.fail_at = fail_at

    def train_stream(self, batch_size: int, seed: int) -> FakeStream:
        return FakeStream(batch_size, seed, self.fail_at)

    def heldout_batches(self, batch_size: int, max_batches: int, seed: int) -> list:
        return [counting_batch(batch_size, seed + 99, -1 - i) for i in range(max_batches)]


def use_fake_data(monkeypatch, fail_at: int | None = None) -> None:
    """Route ``run_pretrain``'s ``myriad.data.prepare_data`` call to ``FakePrepared``."""
    import myriad.data

    def fake_prepare_data(cfg, *, vocab_size, objective, out_dir, seed):
        assert vocab_size == VOCAB and objective == "clm"
        return FakePrepared(out_dir, fail_at)

    monkeypatch.setattr(myriad.data, "prepare_data", fake_prepare_data, raising=False)


def max_logit_gap(a, b) -> float:
    """Largest absolute logit difference of two models on one fixed batch (ids below 64)."""
    ids_BS = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids_BS).logits, b(ids_BS).logits
    assert la is not None and lb is not None
    return (la - lb).abs().max().item()
