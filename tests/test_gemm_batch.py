"""MKL's grouped batch GEMM through ctypes, against torch.matmul one group at a time."""

import platform

import pytest
import torch

from myriad.model import gemm_batch

needs_mkl = pytest.mark.skipif(not gemm_batch.available(), reason="no MKL in this PyTorch build")


def test_available_where_pytorch_ships_mkl():
    """x86-64 Linux wheels link MKL: losing the binding there must fail, not fall back quietly."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("PyTorch links MKL only on x86-64")
    assert torch.backends.mkl.is_available()
    assert gemm_batch.available()


def _groups(rows, k, n, gen):
    rows_G = torch.tensor(rows)
    starts_G = torch.cumsum(rows_G, 0) - rows_G
    a = torch.randn(int(rows_G.sum()), k, generator=gen)
    b = torch.randn(len(rows), k, n, generator=gen)
    return rows_G, starts_G, a, b


@needs_mkl
@pytest.mark.parametrize("b_transposed", [False, True])
def test_row_blocks_times_per_group_matrices(b_transposed):
    gen = torch.Generator().manual_seed(0)
    rows_G, starts_G, a, b = _groups([5, 0, 17, 1], 12, 9, gen)
    if b_transposed:  # stored as (G, n, k), used as its transpose, as the input gradient does
        b = torch.randn(4, 9, 12, generator=gen).transpose(1, 2)
    wide = torch.randn(a.shape[0], 20, generator=gen)
    wide[:, 3:15] = a
    a_view = wide[:, 3:15]  # leading dimension 20, not 12
    c = torch.full((a.shape[0], 9), float("nan"))
    b_off_G = torch.arange(4) * b.stride(0)
    gemm_batch.grouped_gemm(a_view, starts_G * 20, b, b_off_G, c, starts_G * 9, rows_G, 9, 12)
    want = torch.cat(
        [a[s : s + r] @ b[g] for g, (s, r) in enumerate(zip(starts_G, rows_G, strict=True))]
    )
    torch.testing.assert_close(c, want, rtol=1e-5, atol=1e-5)


@needs_mkl
def test_transposed_rows_sum_over_groups_and_empty_groups_are_zero():
    """The weight-gradient form: Aᵀ @ B per group, summing over that group's rows."""
    gen = torch.Generator().manual_seed(1)
    rows_G, starts_G, a, _ = _groups([0, 7, 3, 0], 6, 5, gen)
    dy = torch.randn(a.shape[0], 5, generator=gen)
    out = torch.full((4, 6, 5), float("nan"))  # garbage in: must be overwritten, never read
    gemm_batch.grouped_gemm(
        a.t(), starts_G * 6, dy, starts_G * 5, out, torch.arange(4) * 30, 6, 5, rows_G
    )
    want = torch.stack(
        [
            a[s : s + r].t() @ dy[s : s + r]
            for s, r in zip(starts_G.tolist(), rows_G.tolist(), strict=True)
        ]
    )
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0], torch.zeros(6, 5)) and torch.equal(out[3], torch.zeros(6, 5))


@needs_mkl
def test_rejects_what_sgemm_cannot_take():
    a, b, c = torch.ones(4, 3), torch.ones(1, 3, 2), torch.empty(4, 2)
    off, rows = torch.zeros(1, dtype=torch.int64), torch.tensor([4])
    with pytest.raises(ValueError, match="fp32"):
        gemm_batch.grouped_gemm(a.bfloat16(), off, b, off, c, off, rows, 2, 3)
    with pytest.raises(ValueError, match="row-major"):
        gemm_batch.grouped_gemm(a, off, b, off, torch.empty(2, 4).t(), off, rows, 2, 3)
    with pytest.raises(ValueError, match="A lies outside"):  # raw pointers: never read past
        gemm_batch.grouped_gemm(a, off + 1, b, off, c, off, rows, 2, 3)
    with pytest.raises(ValueError, match="C lies outside"):
        gemm_batch.grouped_gemm(torch.ones(5, 3), off, b, off, c, off, torch.tensor([5]), 2, 3)
