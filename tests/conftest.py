import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same seed; fp32 matmuls stay exact (no TF32)."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids thread hand-off cost on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        # 32 steps: the held-out loss falls clearly; after 16 it fell by as little as -0.01.
        "train.steps=32",
        "train.warmup_steps=2",  # the recipes warm up over 60 steps: this run has 32
        "train.lr=3e-3",  # so that 32 steps move the held-out loss clearly
        "train.batch_size=4",
        "train.eval_every=16",
        "train.eval_batches=4",
        "train.checkpoint_every=0",
        "train.device='cpu'",
    ]
