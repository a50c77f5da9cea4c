"""A safetensors file written one tensor at a time: what safetensors reads back, and a wrong
tensor leaves no file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from myriad.engine.streamfile import write_streamed
from myriad.errors import UserError


def test_streamed_file_reads_back_and_a_wrong_tensor_leaves_nothing(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b.c": torch.arange(7, dtype=torch.float32)}
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    out = write_streamed(tmp_path / "m.safetensors", shapes, iter(tensors.values()))
    back = load_file(out)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())

    wrong = [tensors["a"], torch.zeros(7, dtype=torch.float64)]
    with pytest.raises(UserError, match="b.c is torch.float64"):
        write_streamed(tmp_path / "bad.safetensors", shapes, iter(wrong))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
