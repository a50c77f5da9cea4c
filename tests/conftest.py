import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same seed; fp32 matmuls stay exact (no TF32)."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def shrink_shipped_recipe() -> list[str]:
    """Overrides that turn a shipped tiny-zh-style recipe into a seconds-long CPU run."""
    return [
        "model.vocab_size=400",
        "model.d_model=32",
        "model.d_ff=64",
        "model.moe.d_expert=32",
        "data.seq_len=16",
        "data.max_documents=60",
        "data.heldout_fraction=0.1",
        "train.steps=16",
        "train.warmup_steps=2",  # the recipes warm up over 60 steps: this run has 16
        "train.lr=3e-3",  # so that 16 steps move the held-out loss clearly
        "train.batch_size=4",
        "train.eval_every=8",
        "train.eval_batches=2",
        "train.checkpoint_every=0",
        "train.device='cpu'",
    ]
