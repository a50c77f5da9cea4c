"""Myriad's own CPU kernels for the MoE experts (fp32, AVX2/FMA), bound with ctypes.

* ``csrc/grouped_gemm.c``: many experts' matmuls, each with its own row count, in one call
  that packs each weight slice once into cache (:func:`grouped_matmul`);
* ``csrc/swiglu.c``: the expert SwiGLU's elementwise part in one pass each way
  (:func:`swiglu_forward`, :func:`swiglu_backward`);
* ``csrc/rows.c``: tokens to the experts' row buffer and back, weighted by the router, in one
  pass each way (:func:`dispatch_rows`, :func:`gather_rows`, :func:`combine_backward`);
* ``csrc/topk.c``: the router's top-k expert ids for small k (:func:`topk_ids`).

The C sources ship with the package and are compiled on first use with the system's C compiler
(``$CC``, else ``cc``) into a per-user cache (``$MYRIAD_CACHE``, else ``$XDG_CACHE_HOME/myriad``,
else ``~/.cache/myriad``), keyed by the sources, compiler and flags. Where that cannot happen (no
compiler, no AVX2/FMA, not x86-64, a failed build) :func:`available` is False and the layer uses
MKL's batch GEMM or the padded ``bmm`` and PyTorch's elementwise ops instead; nothing else
changes. The library links the OpenMP runtime PyTorch has already loaded, so it shares
PyTorch's threads.

Before anyone relies on them, the kernels are checked against PyTorch in every layout the MoE
layer uses, including an empty group and sizes that are not multiples of their blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from myriad.model.gemm_batch import Groups, per_group, span

SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.c")))
FLAGS = ("-O3", "-mavx2", "-mfma", "-funroll-loops", "-fopenmp", "-fPIC", "-shared")


def cache_dir() -> Path:
    if os.environ.get("MYRIAD_CACHE"):
        return Path(os.environ["MYRIAD_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "myriad"


def _build(compiler: str) -> Path | None:
    """The compiled library (built now if the cache lacks it), or None if it cannot be."""
    key = hashlib.sha256(" ".join((compiler, *FLAGS)).encode())
    for source in SOURCES:
        key.update(source.read_bytes())
    path = cache_dir() / "kernels" / f"myriad-cpu-{key.hexdigest()[:16]}.so"
    if path.is_file():
        _touch(path)  # marks it in use, so that pruning keeps it
        return path
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [compiler, *FLAGS, "-o", str(tmp), *map(str, SOURCES)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        os.replace(tmp, path)  # atomic: processes building at once each write their own tmp
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        tmp.unlink(missing_ok=True)
    _prune(path.parent, keep=path)
    return path


UNUSED_DAYS = 14  # a cached library no process has loaded for this long is deleted


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still works, it just is not pruned
        os.utime(path)


def _prune(folder: Path, keep: Path) -> None:
    """Delete libraries built from older sources that nothing has loaded for UNUSED_DAYS (one
    per source version would otherwise pile up). A process that has one loaded keeps it."""
    cutoff = time.time() - UNUSED_DAYS * 86400
    for old in folder.glob("*.so"):
        with contextlib.suppress(OSError):  # another process pruned it first
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()


@functools.cache
def _library():
    """The built library with its functions' signatures set, or None where it cannot be."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CC") or "cc")
    path = _build(compiler) if compiler else None
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
        gemm, fwd, bwd = (
            lib.myriad_grouped_gemm,
            lib.myriad_swiglu_forward,
            lib.myriad_swiglu_backward,
        )
        scatter, gather, combine_bwd = (
            lib.myriad_dispatch_rows,
            lib.myriad_gather_rows,
            lib.myriad_combine_backward,
        )
        topk = lib.myriad_topk_rows
    except (OSError, AttributeError):
        return None
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    gemm.argtypes = [i32, i64, ptr, ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, i64, ptr, ptr, ptr]
    gemm.argtypes += [i64] * 3  # the spans of A, B and C
    gemm.restype = i32
    fwd.argtypes = [i32, i64, i64, ptr, i64, ptr, ptr]
    bwd.argtypes = [i32, i64, i64, ptr, i64, ptr, ptr, i64, ptr]
    scatter.argtypes = [i32, i64, i64, i64, ptr, ptr, i64, ptr]
    gather.argtypes = [i32, i64, i64, i64, ptr, ptr, i64, ptr, ptr]
    combine_bwd.argtypes = [i32, i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ptr]
    topk.argtypes = [i32, i64, i64, i64, ptr, ptr]
    for f in (fwd, bwd, scatter, gather, combine_bwd, topk):
        f.restype = None
    return lib


def _strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(-2), t.stride(-1)


def grouped_matmul(
    a: torch.Tensor,
    a_off_G: Groups,
    b: torch.Tensor,
    b_off_G: Groups,
    c: torch.Tensor,
    c_off_G: Groups,
    m_G: Groups | int,
    n: int,
    k_G: Groups | int,
) -> None:
    """``C_g = A_g @ B_g`` for every group g in one call; C is overwritten, never read.

    A_g is the (m_g, k_g) matrix starting ``a_off_G[g]`` elements into ``a`` with ``a``'s last
    two strides (any: a transposed view works), B_g (k_g, n) likewise in ``b`` (one of its two
    strides must be 1), C_g (m_g, n) in ``c`` (rows of unit stride). ``n`` is shared by all
    groups; m and k are one per group or shared. A group with k_g = 0 gets zeros. Offsets are
    integer CPU tensors or numpy arrays of length G.
    """
    lib = _loaded()
    _check_fp32_cpu("grouped_matmul", a, b, c)
    if 1 not in _strides(b) or c.stride(-1) != 1:
        raise ValueError("grouped_matmul needs B with one unit stride and C with unit-stride rows")
    groups = len(a_off_G)
    if groups == 0:
        return
    m, n_G, k = (per_group(v, groups) for v in (m_G, n, k_G))
    offs = [per_group(off, groups) for off in (a_off_G, b_off_G, c_off_G)]
    status = lib.myriad_grouped_gemm(
        torch.get_num_threads(), groups,
        a.data_ptr(), offs[0].ctypes.data, *_strides(a),
        b.data_ptr(), offs[1].ctypes.data, *_strides(b),
        c.data_ptr(), offs[2].ctypes.data, c.stride(-2),
        m.ctypes.data, n_G.ctypes.data, k.ctypes.data,
        span(a), span(b), span(c),
    )  # fmt: skip
    if status == -1:
        raise MemoryError("grouped_matmul could not allocate its packing buffers")
    if status != 0:  # C reads raw memory: it checks every group first
        raise ValueError(f"grouped_matmul: a group of {'ABC'[-2 - status]} lies outside its tensor")


def swiglu_forward(h_RF2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid(gate), silu(gate) * up) of each row's [gate | up], two fresh (R, F) tensors."""
    lib = _loaded()
    _check_fp32_cpu("swiglu_forward", h_RF2)
    _check_rows(h_RF2)
    if h_RF2.shape[1] % 2:
        raise ValueError(f"swiglu_forward: [gate | up] needs an even width, not {h_RF2.shape[1]}")
    rows, f = h_RF2.shape[0], h_RF2.shape[1] // 2
    sig, act = (h_RF2.new_empty(rows, f) for _ in range(2))
    lib.myriad_swiglu_forward(
        torch.get_num_threads(), rows, f, h_RF2.data_ptr(), h_RF2.stride(0),
        sig.data_ptr(), act.data_ptr(),
    )  # fmt: skip
    return sig, act


def swiglu_backward(
    h_RF2: torch.Tensor, sig_RF: torch.Tensor, dact_RF: torch.Tensor, out_RF2: torch.Tensor
) -> torch.Tensor:
    """[d gate | d up] of silu(gate) * up from its output gradient, written into ``out_RF2``."""
    lib = _loaded()
    _check_fp32_cpu("swiglu_backward", h_RF2, sig_RF, dact_RF, out_RF2)
    rows, f = h_RF2.shape[0], h_RF2.shape[1] // 2
    for t, width in ((h_RF2, 2 * f), (sig_RF, f), (dact_RF, f), (out_RF2, 2 * f)):
        if tuple(t.shape) != (rows, width):
            raise ValueError(f"swiglu_backward: a {tuple(t.shape)} operand, not {(rows, width)}")
        _check_rows(t)
    if not (sig_RF.is_contiguous() and out_RF2.is_contiguous()):
        raise ValueError("swiglu_backward needs contiguous sig and out")
    lib.myriad_swiglu_backward(
        torch.get_num_threads(), rows, f, h_RF2.data_ptr(), h_RF2.stride(0),
        sig_RF.data_ptr(), dact_RF.data_ptr(), dact_RF.stride(0), out_RF2.data_ptr(),
    )  # fmt: skip
    return out_RF2


TOPK_MAX = 16  # csrc/topk.c's MAX_K


def topk_ids(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of each row's k largest scores, largest first, the lower id first on a tie (as
    ``scores_TE.topk(k).indices`` up to ties); 1 <= k <= min(E, ``TOPK_MAX``)."""
    _check_fp32_cpu("topk_ids", scores_TE)
    T, E = scores_TE.shape
    if not 1 <= k <= min(E, TOPK_MAX):
        raise ValueError(f"topk_ids: k = {k} for {E} experts (at most {TOPK_MAX})")
    scores_TE = scores_TE.contiguous()
    ids_TK = torch.empty(T, k, dtype=torch.int64)
    _loaded().myriad_topk_rows(
        torch.get_num_threads(), T, E, k, scores_TE.data_ptr(), ids_TK.data_ptr()
    )
    return ids_TK


def dispatch_rows(x_TD: torch.Tensor, slot_A: torch.Tensor, buf_RD: torch.Tensor) -> None:
    """``buf_RD[slot_A[t*K+k]] = x_TD[t]`` for every slot inside the buffer (others: dropped)."""
    T, K, D = _check_rows_problem("dispatch_rows", x_TD, slot_A, buf_RD)
    _loaded().myriad_dispatch_rows(
        torch.get_num_threads(), T, K, D, x_TD.data_ptr(), slot_A.data_ptr(), buf_RD.shape[0],
        buf_RD.data_ptr(),
    )  # fmt: skip


def gather_rows(
    buf_RD: torch.Tensor, slot_A: torch.Tensor, w_TK: torch.Tensor | None, out_TD: torch.Tensor
) -> torch.Tensor:
    """``out_TD[t] = sum_k w_TK[t, k] * buf_RD[slot_A[t*K+k]]`` over slots inside the buffer
    (``w_TK`` None: weights of 1); a token with none gets zeros. Returns ``out_TD``."""
    T, K, D = _check_rows_problem("gather_rows", out_TD, slot_A, buf_RD, w_TK)
    _loaded().myriad_gather_rows(
        torch.get_num_threads(), T, K, D, buf_RD.data_ptr(), slot_A.data_ptr(), buf_RD.shape[0],
        None if w_TK is None else w_TK.data_ptr(), out_TD.data_ptr(),
    )  # fmt: skip
    return out_TD


def combine_backward(
    buf_RD: torch.Tensor,
    slot_A: torch.Tensor,
    w_TK: torch.Tensor,
    dy_TD: torch.Tensor,
    d_buf_RD: torch.Tensor,
    dw_TK: torch.Tensor | None,
) -> None:
    """Gradients of :func:`gather_rows` with weights: ``d_buf_RD[slot] = w * dy[t]`` (rows no
    slot names are left alone) and, unless ``dw_TK`` is None, ``dw_TK[t, k] = row . dy[t]`` (0
    for a dropped slot)."""
    T, K, D = _check_rows_problem("combine_backward", dy_TD, slot_A, buf_RD, w_TK, dw_TK)
    if d_buf_RD.shape != buf_RD.shape or not d_buf_RD.is_contiguous():
        raise ValueError(f"combine_backward: d_buf must be a contiguous {tuple(buf_RD.shape)}")
    _check_fp32_cpu("combine_backward", d_buf_RD)
    _loaded().myriad_combine_backward(
        torch.get_num_threads(), T, K, D, buf_RD.data_ptr(), slot_A.data_ptr(), buf_RD.shape[0],
        w_TK.data_ptr(), dy_TD.data_ptr(), d_buf_RD.data_ptr(),
        None if dw_TK is None else dw_TK.data_ptr(),
    )  # fmt: skip


def _check_rows_problem(
    name: str, tokens_TD: torch.Tensor, slot_A: torch.Tensor, buf_RD: torch.Tensor, *per_TK
) -> tuple[int, int, int]:
    """(T, K, D) of a row move; refuses what the C code would misread (it reads raw memory)."""
    T, D = tokens_TD.shape
    K = slot_A.numel() // T if T else 0
    tensors = [tokens_TD, buf_RD, *(t for t in per_TK if t is not None)]
    _check_fp32_cpu(name, *tensors)
    if slot_A.dtype != torch.int64 or slot_A.device.type != "cpu" or not slot_A.is_contiguous():
        raise ValueError(f"{name}: slots must be a contiguous int64 CPU tensor")
    if slot_A.numel() != T * K or buf_RD.dim() != 2 or buf_RD.shape[1] != D:
        raise ValueError(f"{name}: {slot_A.numel()} slots for {T} tokens, buffer {buf_RD.shape}")
    if any(not t.is_contiguous() for t in tensors):
        raise ValueError(f"{name} needs contiguous tensors")
    if any(t.numel() != T * K for t in per_TK if t is not None):
        raise ValueError(f"{name}: weights must hold {T} x {K} values")
    if slot_A.numel() and int(slot_A.min()) < 0:
        raise ValueError(f"{name}: a negative slot")
    return T, K, D


def _loaded():
    lib = _library()
    if lib is None:
        raise RuntimeError("Myriad's CPU kernels are not available here")
    return lib


def _check_fp32_cpu(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} takes fp32 CPU tensors, not {t.dtype} on {t.device}")


def _check_rows(t: torch.Tensor) -> None:
    """Rows of unit stride, as the elementwise kernels read them."""
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"need a 2-d tensor of unit-stride rows, not {tuple(t.shape)}")


@functools.cache
def available() -> bool:
    """True when the kernels are built and match PyTorch here in every layout the layer uses."""
    if _library() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    rows_G, d, f = torch.tensor([7, 0, 13]), 40, 20  # not multiples of the 6 x 16 blocks
    starts_G = torch.cumsum(rows_G, 0) - rows_G
    x = torch.randn(int(rows_G.sum()), d, generator=gen)
    w = torch.randn(3, d, f, generator=gen)
    w_off = torch.arange(3) * d * f
    y = torch.full((x.shape[0], f), float("nan"))
    grouped_matmul(x, starts_G * d, w, w_off, y, starts_G * f, rows_G, f, d)
    want_y = torch.cat([x[:7] @ w[0], x[7:] @ w[2]])
    # dgrad: y @ W_g^T with W read transposed (its unit stride along the inner dimension)
    wt = torch.randn(3, d, f, generator=gen).transpose(1, 2)  # (3, f, d) views
    dx = torch.full((x.shape[0], d), float("nan"))
    grouped_matmul(y, starts_G * f, wt, w_off, dx, starts_G * d, rows_G, d, f)
    want_dx = torch.cat([y[:7] @ wt[0], y[7:] @ wt[2]])
    # wgrad: x_g^T @ y_g, an empty group giving zeros
    dw = torch.full((3, d, f), float("nan"))
    grouped_matmul(x.t(), starts_G * d, y, starts_G * f, dw, w_off, d, f, rows_G)
    want_dw = torch.stack([x[:7].t() @ y[:7], torch.zeros(d, f), x[7:].t() @ y[7:]])
    # SwiGLU on a view whose rows are wider than [gate | up], with a width not a multiple of 8
    h = torch.randn(9, 2 * 11 + 3, generator=gen)[:, 3:] * 4
    gate, up = h.chunk(2, dim=-1)
    sig, act = swiglu_forward(h)
    dact = torch.randn(9, 11, generator=gen)
    dh = swiglu_backward(h, sig, dact, torch.empty(9, 22))
    s = torch.sigmoid(gate)  # d silu(g)/dg = s * (1 + g * (1 - s))
    want_dh = torch.cat([dact * up * s * (1 + gate * (1 - s)), dact * gate * s], dim=1)
    # Rows to the buffer and back, token 1's second assignment dropped (slot 6 >= 6 rows)
    tokens, w_TK = torch.randn(3, 11, generator=gen), torch.rand(3, 2, generator=gen)
    slot_A = torch.tensor([4, 0, 2, 6, 5, 1])
    buf = torch.zeros(6, 11)
    dispatch_rows(tokens, slot_A, buf)
    kept = slot_A < 6
    want_buf = torch.zeros(6, 11).index_copy_(0, slot_A[kept], tokens.repeat_interleave(2, 0)[kept])
    rows_AD = torch.cat([want_buf, torch.zeros(1, 11)])[slot_A].view(3, 2, 11)
    mixed = gather_rows(want_buf, slot_A, w_TK, torch.empty(3, 11))
    d_buf, dw_TK = torch.zeros(6, 11), torch.empty(3, 2)
    combine_backward(want_buf, slot_A, w_TK, tokens, d_buf, dw_TK)
    d_rows_AD = (w_TK.unsqueeze(-1) * tokens.unsqueeze(1)).view(6, 11)
    want_d_buf = torch.zeros(6, 11).index_copy_(0, slot_A[kept], d_rows_AD[kept])
    pairs = [(y, want_y), (dx, want_dx), (dw, want_dw), (sig, s)]
    pairs += [(act, F.silu(gate) * up), (dh, want_dh), (buf, want_buf), (d_buf, want_d_buf)]
    pairs += [(mixed, (w_TK.unsqueeze(-1) * rows_AD).sum(1))]
    pairs += [(dw_TK, (rows_AD * tokens.unsqueeze(1)).sum(-1))]
    scores = torch.tensor([[0.1, 0.7, 0.2, 0.7, 0.05]]).repeat(3, 1)  # a tie: the lower id first
    if not torch.equal(topk_ids(scores, 3), torch.tensor([[1, 3, 2]]).repeat(3, 1)):
        return False
    return all(torch.allclose(got, want, rtol=1e-5, atol=1e-4) for got, want in pairs)
