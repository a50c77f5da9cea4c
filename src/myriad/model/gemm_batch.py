"""One call for many fp32 matmuls of different sizes: MKL's ``cblas_sgemm_batch`` on the CPU.

PyTorch's x86 CPU builds link Intel MKL into ``libtorch_cpu`` and export its C interface, but
torch itself offers no batched matmul whose members differ in size: ``bmm`` needs one shape for
all, and ``grouped_mm`` on the CPU runs one parallel ``mm`` per group. MKL's *grouped* batch
takes one (m, n, k) per group and schedules every product across the threads in one call, so
experts with different row counts run without padding (docs/moe.md). Builds without MKL (ARM,
macOS) lack the symbol; :func:`available` is then False and callers fall back to padded ``bmm``.

The symbol is bound once, through ``ctypes``, and checked against ``torch.matmul`` on a small
problem that has an empty group before anyone relies on it (this also confirms the 32-bit
integer interface that PyTorch's MKL uses).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch

Groups = torch.Tensor | np.ndarray  # one integer per group, on the CPU

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_F32 = 4  # bytes per element: MKL's sgemm is fp32 only


@functools.cache
def _sgemm_batch():
    """The bound ``cblas_sgemm_batch``, or None where this PyTorch build does not export it."""
    if ctypes.sizeof(ctypes.c_void_p) != 8 or not torch.backends.mkl.is_available():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for path in sorted(lib_dir.glob("*torch_cpu*")):
        try:
            fn = ctypes.CDLL(str(path)).cblas_sgemm_batch
        except (OSError, AttributeError):
            continue
        ptr = ctypes.c_void_p
        fn.argtypes = [ctypes.c_int, *[ptr] * 13, ctypes.c_int, ptr]
        fn.restype = None
        return fn
    return None


def _layout(t: torch.Tensor) -> tuple[int, int]:
    """(transpose flag, leading dimension) of the row-major matrices in the last two dims."""
    if t.stride(-1) == 1:
        return _NO_TRANS, t.stride(-2)
    if t.stride(-2) == 1:
        return _TRANS, t.stride(-1)
    raise ValueError("gemm_batch needs matrices with one unit stride")


def span(t: torch.Tensor) -> int:
    """Elements addressable from ``t``'s pointer through its shape and strides."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


def per_group(v: torch.Tensor | np.ndarray | int, groups: int) -> np.ndarray:
    """One contiguous int64 value per group: a CPU tensor's or an array's numbers, or one int
    repeated (the caller keeps it alive while a library reads it)."""
    if isinstance(v, torch.Tensor):
        v = v.numpy()
    if isinstance(v, np.ndarray):
        return np.ascontiguousarray(v, dtype=np.int64)
    return np.full(groups, v, dtype=np.int64)


def _check_inside(
    name: str,
    t: torch.Tensor,
    off_G: np.ndarray,
    rows_G: np.ndarray,
    cols_G: np.ndarray,
    trans: int,
    ld: int,
) -> None:
    """Refuse a group whose (rows, cols) matrix would reach outside ``t``: MKL reads raw memory."""
    stored_rows, stored_cols = (cols_G, rows_G) if trans == _TRANS else (rows_G, cols_G)
    end_G = off_G + (stored_rows - 1) * ld + stored_cols
    used_G = (rows_G > 0) & (cols_G > 0)
    if (used_G & ((off_G < 0) | (end_G > span(t)))).any():
        raise ValueError(f"gemm_batch: a group of {name} lies outside its tensor")


def grouped_gemm(
    a: torch.Tensor,
    a_off_G: Groups,
    b: torch.Tensor,
    b_off_G: Groups,
    c: torch.Tensor,
    c_off_G: Groups,
    m_G: Groups | int,
    n_G: Groups | int,
    k_G: Groups | int,
) -> None:
    """``C_g = A_g @ B_g`` for every group g, in one MKL call; C is overwritten, never read.

    A_g is the (m_g, k_g) matrix that starts ``a_off_G[g]`` elements into ``a``, laid out with
    ``a``'s strides (its last two dims; a transposed view works), and likewise B_g (k_g, n_g) in
    ``b`` and C_g (m_g, n_g) in ``c`` (row-major). A group with k_g = 0 gets C_g = 0. Offsets are
    integer CPU tensors or numpy arrays of length G (the number of groups); each size is one too,
    or an int shared by all groups. A group reaching outside its tensor is refused before MKL
    runs.
    """
    fn = _sgemm_batch()
    if fn is None:
        raise RuntimeError("this PyTorch build has no MKL cblas_sgemm_batch")
    for t in (a, b, c):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"gemm_batch takes fp32 CPU tensors, not {t.dtype} on {t.device}")
    (ta, lda), (tb, ldb), (tc, ldc) = _layout(a), _layout(b), _layout(c)
    if tc != _NO_TRANS:
        raise ValueError("gemm_batch writes row-major outputs only")
    groups = len(a_off_G)
    if groups == 0:
        return
    # numpy, not torch, for these small per-call arrays: ~1 us per operation instead of ~5.
    m, n, k = (per_group(v, groups) for v in (m_G, n_G, k_G))
    offsets = [per_group(off, groups) for off in (a_off_G, b_off_G, c_off_G)]
    for name, t, off, rows, cols, trans, ld in (
        ("A", a, offsets[0], m, k, ta, lda),
        ("B", b, offsets[1], k, n, tb, ldb),
        ("C", c, offsets[2], m, n, tc, ldc),
    ):
        _check_inside(name, t, off, rows, cols, trans, ld)
    a_ptr, b_ptr, c_ptr = (
        t.data_ptr() + off * _F32 for t, off in zip((a, b, c), offsets, strict=True)
    )

    def same(v: int | float, dtype: type = np.int32) -> np.ndarray:
        return np.full(groups, v, dtype=dtype)

    m32, n32, k32 = (v.astype(np.int32) for v in (m, n, k))
    args = [  # kept alive in this list for the duration of the call
        same(ta), same(tb), m32, n32, k32, same(1.0, np.float32), a_ptr, same(lda),
        b_ptr, same(ldb), same(0.0, np.float32), c_ptr, same(ldc),
    ]  # fmt: skip
    sizes = same(1)  # one product per group
    fn(_ROW_MAJOR, *(arr.ctypes.data for arr in args), groups, sizes.ctypes.data)


@functools.cache
def available() -> bool:
    """True when :func:`grouped_gemm` is bound and gives ``torch.matmul``'s results here."""
    if _sgemm_batch() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    m_G, k, n = torch.tensor([3, 0, 5]), 4, 6
    a = torch.randn(int(m_G.sum()), k, generator=gen)
    b = torch.randn(3, k, n, generator=gen)
    c = torch.full((a.shape[0], n), float("nan"))
    starts_G = torch.cumsum(m_G, 0) - m_G
    grouped_gemm(a, starts_G * k, b, torch.arange(3) * k * n, c, starts_G * n, m_G, n, k)
    want = torch.cat([a[:3] @ b[0], a[3:] @ b[2]])
    # The weight-gradient form: Aᵀ (k, m_g) from a transposed view, with an empty group.
    dw = torch.full((3, k, n), float("nan"))
    grouped_gemm(a.t(), starts_G * k, c, starts_G * n, dw, torch.arange(3) * k * n, k, n, m_G)
    want_dw = torch.stack([a[:3].t() @ want[:3], torch.zeros(k, n), a[3:].t() @ want[3:]])
    return torch.allclose(c, want, atol=1e-5) and torch.allclose(dw, want_dw, atol=1e-5)
