import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same seed; fp32 matmuls stay exact (no TF32)."""
    torch.manual_seed(0)
    yield
