"""Myriad's AVX2 grouped GEMM (compiled on first use) against float64 matmuls, group by group."""

import functools
import os
import platform
import shutil
import time

import pytest
import torch

from myriad.model import cpu_kernels

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.available(), reason="no C compiler or no AVX2 here: the layer uses MKL instead"
)


def test_builds_where_a_compiler_and_avx2_exist():
    """On x86-64 with AVX2 and a C compiler the kernel must build: not fall back quietly."""
    if platform.machine() != "x86_64" or shutil.which("cc") is None:
        pytest.skip("needs x86-64 and cc")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2")
    assert cpu_kernels.available()


def assert_as_exact_as_torch(got, a_list, b_list, stack=torch.cat):
    """Within 1e-5 of the float64 products, or of torch's own fp32 matmul's error if larger
    (long sums: 600 fp32 terms here are off by ~2e-5 in torch too)."""
    exact = stack([a.double() @ b.double() for a, b in zip(a_list, b_list, strict=True)])
    fp32 = stack([a @ b for a, b in zip(a_list, b_list, strict=True)])
    bound = max(1e-5, 2 * (fp32.double() - exact).abs().max().item())
    assert (got.double() - exact).abs().max().item() <= bound


def _problem(rows, k, n, gen, b_transposed=False):
    rows_G = torch.tensor(rows)
    starts_G = torch.cumsum(rows_G, 0) - rows_G
    wide = torch.randn(int(rows_G.sum()), k + 5, generator=gen)
    a = wide[:, 2 : 2 + k]  # row stride k + 5, not k
    if b_transposed:  # stored (G, n, k), used as its transpose: the input-gradient form
        b = torch.randn(len(rows), n, k, generator=gen).transpose(1, 2)
    else:
        b = torch.randn(len(rows), k, n, generator=gen)
    return rows_G, starts_G, a, b


@needs_kernel
@pytest.mark.parametrize("b_transposed", [False, True])
@pytest.mark.parametrize("k, n", [(12, 16), (40, 20), (600, 48), (7, 3)])
def test_row_blocks_times_per_group_matrices(b_transposed, k, n):
    """Row counts around the 6-row block, widths around the 16-column panel, depths past the
    256-row packing depth (accumulated in two passes) and an empty group."""
    gen = torch.Generator().manual_seed(k * n)
    rows_G, starts_G, a, b = _problem([5, 0, 17, 1, 6, 12], k, n, gen, b_transposed)
    c = torch.full((a.shape[0], n), float("nan"))  # garbage in: overwritten, never read
    b_off_G = torch.arange(6) * b.stride(0)
    cpu_kernels.grouped_matmul(a, starts_G * (k + 5), b, b_off_G, c, starts_G * n, rows_G, n, k)
    bounds = list(zip(starts_G.tolist(), rows_G.tolist(), strict=True))
    assert_as_exact_as_torch(c, [a[s : s + r] for s, r in bounds], [b[g] for g in range(6)])


@needs_kernel
@pytest.mark.parametrize("b_transposed", [False, True])
def test_groups_either_side_of_the_wide_item_threshold(b_transposed):
    """Groups of up to 48 rows with row-major B take one item across all 200 columns, larger
    ones items of 128 columns; both must give the same products."""
    gen = torch.Generator().manual_seed(200)
    rows_G, starts_G, a, b = _problem([48, 49, 3, 70], 30, 200, gen, b_transposed)
    c = torch.full((a.shape[0], 200), float("nan"))
    b_off_G = torch.arange(4) * b.stride(0)
    cpu_kernels.grouped_matmul(a, starts_G * 35, b, b_off_G, c, starts_G * 200, rows_G, 200, 30)
    bounds = list(zip(starts_G.tolist(), rows_G.tolist(), strict=True))
    assert_as_exact_as_torch(c, [a[s : s + r] for s, r in bounds], [b[g] for g in range(4)])


@needs_kernel
def test_groups_either_side_of_the_dot_product_threshold():
    """With B a weight read transposed, groups of up to 16 rows take dot products over 256
    weight rows per item (300 columns: two items), larger ones the packed path."""
    gen = torch.Generator().manual_seed(16)
    rows_G, starts_G, a, b = _problem([16, 17, 9, 1, 4], 37, 300, gen, b_transposed=True)
    c = torch.full((a.shape[0], 300), float("nan"))
    b_off_G = torch.arange(5) * b.stride(0)
    cpu_kernels.grouped_matmul(a, starts_G * 42, b, b_off_G, c, starts_G * 300, rows_G, 300, 37)
    bounds = list(zip(starts_G.tolist(), rows_G.tolist(), strict=True))
    assert_as_exact_as_torch(c, [a[s : s + r] for s, r in bounds], [b[g] for g in range(5)])


@needs_kernel
@pytest.mark.parametrize("n", [5, 32, 300])
def test_transposed_rows_sum_over_groups_and_empty_groups_are_zero(n):
    """The weight-gradient form: Aᵀ @ B per group, summing over that group's rows (300 of them in
    one group: two packing passes)."""
    gen = torch.Generator().manual_seed(n)
    rows_G = torch.tensor([0, 7, 300, 0, 13])
    starts_G = torch.cumsum(rows_G, 0) - rows_G
    x = torch.randn(int(rows_G.sum()), 22, generator=gen)
    dy = torch.randn(x.shape[0], n, generator=gen)
    out = torch.full((5, 22, n), float("nan"))
    cpu_kernels.grouped_matmul(
        x.t(), starts_G * 22, dy, starts_G * n, out, torch.arange(5) * 22 * n, 22, n, rows_G
    )
    bounds = list(zip(starts_G.tolist(), rows_G.tolist(), strict=True))
    xs, dys = [x[s : s + r].t() for s, r in bounds], [dy[s : s + r] for s, r in bounds]
    assert_as_exact_as_torch(out, xs, dys, stack=torch.stack)
    assert torch.equal(out[0], torch.zeros(22, n)) and torch.equal(out[3], torch.zeros(22, n))


@needs_kernel
@pytest.mark.parametrize("b_transposed", [False, True])
def test_results_do_not_depend_on_the_thread_count(b_transposed):
    gen = torch.Generator().manual_seed(3)
    rows_G, starts_G, a, b = _problem([64, 3, 130, 0, 41, 12], 300, 160, gen, b_transposed)
    args = (a, starts_G * 305, b, torch.arange(6) * b.stride(0))
    outs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            c = torch.empty(a.shape[0], 160)
            cpu_kernels.grouped_matmul(*args, c, starts_G * 160, rows_G, 160, 300)
            outs.append(c)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_kernel
def test_bad_operands_are_refused_before_the_kernel_runs():
    a, b, c = torch.ones(4, 3), torch.ones(1, 3, 2), torch.empty(4, 2)
    off, rows = torch.zeros(1, dtype=torch.int64), torch.tensor([4])
    with pytest.raises(ValueError, match="fp32 CPU tensors"):
        cpu_kernels.grouped_matmul(a.double(), off, b, off, c, off, rows, 2, 3)
    with pytest.raises(ValueError, match="unit stride"):
        cpu_kernels.grouped_matmul(a, off, b[:, ::2, :][:, :, ::2], off, c, off, rows, 1, 2)
    with pytest.raises(ValueError, match="a group of C lies outside"):
        cpu_kernels.grouped_matmul(a, off, b, off, c, off + 1, rows, 2, 3)
    with pytest.raises(ValueError, match="a group of A lies outside"):
        cpu_kernels.grouped_matmul(a, off, b, off, torch.empty(5, 2), off, torch.tensor([5]), 2, 3)


def test_without_a_compiler_it_is_unavailable_and_nothing_is_left(tmp_path, monkeypatch):
    """No ``cc``: not available (the layer then uses MKL's batch GEMM), no build debris."""
    monkeypatch.setenv("MYRIAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    for fn in (cpu_kernels._library, cpu_kernels.available):
        monkeypatch.setattr(cpu_kernels, fn.__name__, functools.cache(fn.__wrapped__))
    assert not cpu_kernels.available()
    assert not any((tmp_path / "cache").rglob("*.so"))


@needs_kernel
def test_a_failed_build_leaves_no_library_and_a_good_one_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MYRIAD_CACHE", str(tmp_path))
    false = shutil.which("false")
    if false is None:
        pytest.skip("no false(1)")
    assert cpu_kernels._build(false) is None  # a compiler that fails
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    path = cpu_kernels._build(shutil.which("cc"))
    assert path is not None and path.parent == tmp_path / "kernels"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files
    assert cpu_kernels._build(shutil.which("cc")) == path  # cached: not built again


@needs_kernel
def test_a_new_build_prunes_only_libraries_unused_for_two_weeks(tmp_path, monkeypatch):
    monkeypatch.setenv("MYRIAD_CACHE", str(tmp_path))
    (tmp_path / "kernels").mkdir()
    stale, recent = tmp_path / "kernels" / "old-a.so", tmp_path / "kernels" / "old-b.so"
    for path, days in ((stale, cpu_kernels.UNUSED_DAYS + 1), (recent, cpu_kernels.UNUSED_DAYS - 1)):
        path.write_bytes(b"")
        os.utime(path, (time.time() - days * 86400,) * 2)
    built = cpu_kernels._build(shutil.which("cc"))
    assert built is not None
    assert sorted(p.name for p in built.parent.iterdir()) == sorted([built.name, recent.name])
    os.utime(built, (time.time() - 30 * 86400,) * 2)
    assert cpu_kernels._build(shutil.which("cc")) == built  # loading it marks it in use again
    assert built.stat().st_mtime > time.time() - 60


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rows_to_the_buffer_and_back_match_index_ops(k):
    """Dispatch, weighted gather and the combine's backward against index_copy_/index_select,
    with every third assignment dropped (its slot past the buffer's end)."""
    gen = torch.Generator().manual_seed(k)
    T, D = 7, 37
    x = torch.randn(T, D, generator=gen)
    w = torch.rand(T, k, generator=gen)
    kept = torch.arange(T * k) % 3 != 2
    rows = int(kept.sum())  # each kept assignment names its own buffer row, in shuffled order
    slot = torch.full((T * k,), rows)
    slot[kept] = torch.randperm(rows, generator=gen)
    buf = torch.full((rows, D), float("nan"))
    cpu_kernels.dispatch_rows(x, slot, buf)
    want = torch.full((rows, D), float("nan"))
    want.index_copy_(0, slot[kept], x.repeat_interleave(k, 0)[kept])
    assert torch.equal(buf, want)

    rows_A = torch.cat([want, torch.zeros(1, D)])[slot].view(T, k, D)
    mixed = cpu_kernels.gather_rows(want, slot, w, torch.empty(T, D))
    assert torch.allclose(mixed, (w.unsqueeze(-1) * rows_A).sum(1), rtol=1e-6, atol=1e-6)
    summed = cpu_kernels.gather_rows(want, slot, None, torch.empty(T, D))
    assert torch.allclose(summed, rows_A.sum(1), rtol=1e-6, atol=1e-6)

    dy = torch.randn(T, D, generator=gen)
    d_buf, dw = torch.full((rows, D), float("nan")), torch.full((T, k), float("nan"))
    cpu_kernels.combine_backward(want, slot, w, dy, d_buf, dw)
    d_rows_A = (w.unsqueeze(-1) * dy.unsqueeze(1)).view(T * k, D)
    assert torch.equal(d_buf, torch.empty(rows, D).index_copy_(0, slot[kept], d_rows_A[kept]))
    assert torch.allclose(dw, (rows_A * dy.unsqueeze(1)).sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(dw.flatten()[~kept], torch.zeros(int((~kept).sum())))


@needs_kernel
def test_rows_refuse_what_they_would_misread():
    x, buf = torch.randn(4, 8), torch.empty(4, 8)
    with pytest.raises(ValueError, match="4 slots for 4 tokens"):
        cpu_kernels.dispatch_rows(x, torch.arange(4), torch.empty(4, 9))
    with pytest.raises(ValueError, match="negative slot"):
        cpu_kernels.dispatch_rows(x, torch.tensor([0, -1, 2, 3]), buf)
    with pytest.raises(ValueError, match="int64"):
        cpu_kernels.dispatch_rows(x, torch.arange(4, dtype=torch.int32), buf)
    with pytest.raises(ValueError, match="weights must hold 4 x 1"):
        cpu_kernels.gather_rows(buf, torch.arange(4), torch.ones(3, 1), torch.empty(4, 8))


@needs_kernel
@pytest.mark.parametrize("experts, k", [(64, 2), (256, 1), (6, 6), (40, 16)])
def test_top_ids_match_torch_topk(experts, k):
    gen = torch.Generator().manual_seed(experts)
    scores = torch.randn(300, experts, generator=gen).softmax(-1)
    assert torch.equal(cpu_kernels.topk_ids(scores, k), scores.topk(k, dim=-1).indices)


@needs_kernel
def test_top_ids_break_ties_by_lower_id_and_stay_valid_for_nan():
    scores = torch.tensor([[0.2, 0.5, 0.5, 0.1, 0.5], [float("nan")] * 5])
    ids = cpu_kernels.topk_ids(scores, 2)
    assert ids[0].tolist() == [1, 2]
    assert ((ids[1] >= 0) & (ids[1] < 5)).all()
    with pytest.raises(ValueError, match="k = 17"):
        cpu_kernels.topk_ids(torch.rand(2, 40), 17)
