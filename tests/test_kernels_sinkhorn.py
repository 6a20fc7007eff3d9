"""kernels.sinkhorn_knopp: the Triton passes under TRITON_INTERPRET=1 against the torch path, the factored form, and
the sums over ranks (two threads standing in for two ranks)."""
import threading

import pytest
import torch

from tests.kernel_helpers import interpreted_kernels

kernels = interpreted_kernels()
from kernels import sinkhorn  # noqa: E402


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles smaller than the shapes below: several steps a row, several row tiles and chunks, ragged edges."""
    monkeypatch.setattr(sinkhorn, "LAUNCH", dict(sinkhorn.LAUNCH, row_block=32, col_bk=16, col_bm=4, chunk_rows=8,
                                                 max_chunks=3))


@pytest.mark.parametrize("M,K,iters", [(40, 300, 3), (7, 37, 1), (50, 64, 0), (33, 100, 5), (1, 5, 2)])
def test_triton_matches_the_torch_path(small_tiles, M, K, iters):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    logits = (torch.randn(M, K, generator=g) * 0.3).half()
    temp = torch.tensor(0.07)
    want = kernels.sinkhorn_knopp(logits, temp, iters, impl="torch")
    got = kernels.sinkhorn_knopp(logits, temp, iters, impl="triton")
    assert got.dtype == torch.float32 and got.shape == (M, K)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-8)
    if iters:  # rows are distributions after every alternation
        torch.testing.assert_close(got.sum(1), torch.ones(M))
    f = kernels.sinkhorn_knopp(logits, temp, iters, impl="triton", factored=True)
    assert isinstance(f, kernels.FactoredTargets) and f.logits is logits and f.row.shape == (M,)
    torch.testing.assert_close(f.dense(), want, rtol=2e-5, atol=1e-8)
    ft = kernels.sinkhorn_knopp(logits, temp, iters, impl="torch", factored=True)
    torch.testing.assert_close(ft.dense(), want, rtol=2e-5, atol=1e-8)


def test_many_iterations_balance_the_columns(small_tiles):
    """Run long enough, every prototype takes M / K of the mass (the doubly stochastic limit)."""
    logits = torch.randn(24, 6) * 0.5
    q = kernels.sinkhorn_knopp(logits, 0.5, 300, impl="triton")
    torch.testing.assert_close(q.sum(0), torch.full((6,), 4.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(q.sum(1), torch.ones(24))


def test_strided_logits_and_a_float_temperature(small_tiles):
    base = torch.randn(20, 50)
    logits = base[:, 3:43]  # rows 50 apart
    torch.testing.assert_close(kernels.sinkhorn_knopp(logits, 0.1, 3, impl="triton"),
                               kernels.sinkhorn_knopp(logits.contiguous(), torch.tensor(0.1), 3, impl="torch"),
                               rtol=2e-5, atol=1e-8)


def test_errors():
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        kernels.sinkhorn_knopp(torch.randn(3), 0.1)
    with pytest.raises(ValueError, match="iters"):
        kernels.sinkhorn_knopp(torch.randn(3, 4), 0.1, -1)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_sums_span_ranks(small_tiles, monkeypatch, impl):
    """Rows split over two ranks (one with no rows at all, as a rank with no masked patch) give the whole batch's
    targets: the shift, M and the column sums go through all_reduce. Two threads stand in for the ranks; the
    interpreted kernels run one at a time (the interpreter is not thread-safe), and a failing rank aborts the other's
    wait instead of leaving it blocked."""
    lock = threading.Lock()
    for name in ("_sk_rows_op", "_sk_cols_op"):
        op = getattr(sinkhorn, name)

        def locked(*args, _op=op):
            with lock:
                return _op(*args)

        monkeypatch.setattr(sinkhorn, name, locked)
    torch.manual_seed(0)
    logits = torch.randn(30, 40)
    want = kernels.sinkhorn_knopp(logits, 0.2, 3, impl="torch")
    for parts in ((logits[:12], logits[12:]), (logits, logits[:0])):
        barrier, slots, out, failed = threading.Barrier(2, timeout=120), [None, None], [None, None], []

        def all_reduce(t, op="sum", rank=0):
            slots[rank] = t.clone()
            barrier.wait()
            a, b = slots
            t.copy_(torch.maximum(a, b) if op == "max" else a + b)
            barrier.wait()
            return t

        def run(rank):
            try:
                out[rank] = kernels.sinkhorn_knopp(parts[rank], 0.2, 3, impl=impl,
                                                   all_reduce=lambda t, op="sum": all_reduce(t, op, rank))
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                failed.append(e)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failed:
            raise failed[0]
        torch.testing.assert_close(torch.cat(out), want, rtol=2e-5, atol=1e-8)


def test_custom_ops_pass_opcheck():
    x, shift, tinv = torch.randn(9, 21), torch.tensor([2.5]), torch.tensor([4.0])
    for op, args in ((sinkhorn._sk_rows_op, (x, torch.rand(21), shift, tinv)),
                     (sinkhorn._sk_rows_op, (x, None, shift, tinv)),
                     (sinkhorn._sk_cols_op, (x, torch.rand(9), shift, tinv))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("M,K,temp,shifted", [(40, 300, 0.04, False), (7, 37, 0.5, False), (1, 5, 0.026, False),
                                               (33, 100, 0.07, False), (12, 64, 0.015, True)])
def test_softmax_targets_match_softmax(small_tiles, M, K, temp, shifted):
    """DINO's softmax centering, dense and factored, torch and Triton, against F.softmax((x - center) / temp): cosine
    scores in [-1, 1] and centers as far apart as they can be, down to temp 0.026 (exponents up to +-77 in one step);
    and (shifted) scores near 1 against centers near -1 at temp 0.015, where exp((x - center) / temp) itself is e^133,
    past fp32: the factors are taken about the midranges, so they stay near 1."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    if shifted:
        logits = (0.95 + torch.rand(M, K, generator=g) * 0.05).half()
        center = -0.95 - torch.rand(1, K, generator=g) * 0.05
    else:
        logits = (torch.rand(M, K, generator=g) * 2 - 1).half()
        center = torch.rand(1, K, generator=g) * 2 - 1
        center[0, 0], logits[0, 0] = -1.0, 1.0  # the widest spread: (max score - min center) / temp = 2 / temp
    want = torch.softmax((logits.float() - center) / temp, -1)
    for impl in ("torch", "triton"):
        dense = kernels.softmax_targets(logits, center, torch.tensor(temp), impl=impl)
        assert dense.dtype == torch.float32 and dense.shape == (M, K)
        torch.testing.assert_close(dense, want, rtol=1e-4, atol=1e-7)
        f = kernels.softmax_targets(logits, center.reshape(-1), temp, impl=impl, factored=True)
        assert isinstance(f, kernels.FactoredTargets) and f.logits is logits and f.row.shape == (M,)
        assert torch.isfinite(f.row).all() and torch.isfinite(f.col).all()
        torch.testing.assert_close(f.dense(), want, rtol=1e-4, atol=1e-7)


def test_softmax_targets_feed_the_cross_entropy_and_take_empty_ranks():
    """Factored softmax targets through soft_cross_entropy equal the written-out ones; a rank with no masked patches
    gets empty targets; a center of the wrong size is refused."""
    g = torch.Generator().manual_seed(3)
    logits, center = torch.rand(9, 50, generator=g) * 2 - 1, torch.rand(50, generator=g) * 0.4
    scores = torch.randn(9, 50, generator=g)
    f = kernels.softmax_targets(logits, center, 0.07, impl="triton", factored=True)
    dense = kernels.softmax_targets(logits, center, 0.07, impl="torch")
    torch.testing.assert_close(kernels.soft_cross_entropy(scores, f, 0.1, impl="triton"),
                               kernels.soft_cross_entropy(scores, dense, 0.1, impl="torch"), rtol=1e-5, atol=1e-6)
    empty = kernels.softmax_targets(logits[:0], center, 0.07, impl="triton", factored=True)
    assert empty.row.shape == (0,) and torch.isfinite(empty.col).all()
    with pytest.raises(ValueError, match="one value per column"):
        kernels.softmax_targets(logits, center[:10], 0.07)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        kernels.softmax_targets(logits[0], center, 0.07)
