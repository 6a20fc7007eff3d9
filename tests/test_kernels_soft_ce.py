"""kernels.soft_cross_entropy: the Triton forward / backward under TRITON_INTERPRET=1 against the torch form."""
import math

import pytest
import torch

from tests.kernel_helpers import interpreted_kernels

kernels = interpreted_kernels()
from kernels import soft_ce  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _targets(M, K, g):
    """Rows of distributions (Sinkhorn's / a softmax's), some peaked."""
    return torch.softmax(torch.randn(M, K, generator=g) * 4, -1)


@pytest.mark.parametrize("M,K,block", [(7, 37, 16), (3, 300, 64), (5, 64, 64), (2, 1, 16)])
def test_soft_ce_matches_the_torch_form(monkeypatch, M, K, block):
    """Several steps a row (K > block, ragged last step), one exact step, one class; values and gradients."""
    monkeypatch.setitem(soft_ce.LAUNCH, "block", block)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    scores = (torch.randn(M, K, generator=g) * 3).requires_grad_()
    targets = _targets(M, K, g)
    got = kernels.soft_cross_entropy(scores, targets, 0.1, impl="triton")
    want = soft_ce.soft_cross_entropy_reference(scores, targets, 0.1)
    assert got.dtype == torch.float32 and got.shape == (M,)
    assert rel(got, want) < 1e-5, (got, want)
    w = torch.randn(M, generator=g)
    (dg,), (dw,) = torch.autograd.grad((got * w).sum(), scores), torch.autograd.grad((want * w).sum(), scores)
    assert rel(dg, dw) < 1e-5 or dw.abs().max() < 1e-6


def test_soft_ce_16_bit_scores_and_strided_rows(monkeypatch):
    """fp16 scores (the interpreter's bf16 is not exact) viewed from a wider buffer; the gradient comes back in the
    scores' dtype; targets that are not distributions (row sums != 1) follow the formula too."""
    monkeypatch.setitem(soft_ce.LAUNCH, "block", 32)
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 150, generator=g).half()
    scores = wide[:, 10:110].requires_grad_()  # row stride 150
    targets = torch.rand(6, 100, generator=g)
    got = kernels.soft_cross_entropy(scores, targets, 0.07, impl="triton")
    want = soft_ce.soft_cross_entropy_reference(scores, targets, 0.07)
    assert rel(got, want) < 1e-4
    (dg,), (dw,) = torch.autograd.grad(got.sum(), scores), torch.autograd.grad(want.sum(), scores)
    assert dg.dtype == torch.float16 and rel(dg, dw) < 2e-3


def test_soft_ce_extreme_scores_stay_finite(monkeypatch):
    """Scores / temp far apart (exp would overflow without the running max) and rows whose targets sit on one class."""
    monkeypatch.setitem(soft_ce.LAUNCH, "block", 16)
    scores = torch.tensor([[500.0, -500.0, 0.0] * 20, [1e-3] * 60]).requires_grad_()
    targets = torch.zeros(2, 60)
    targets[0, 1] = 1.0
    targets[1, 5] = 1.0
    got = kernels.soft_cross_entropy(scores, targets, 0.04, impl="triton")
    want = soft_ce.soft_cross_entropy_reference(scores, targets, 0.04)
    assert torch.isfinite(got).all() and rel(got, want) < 1e-6
    assert abs(got[1].item() - math.log(60)) < 1e-4  # uniform scores: log K
    (dg,) = torch.autograd.grad(got.sum(), scores)
    assert torch.isfinite(dg).all()


def test_soft_ce_dispatch_and_checks():
    s, t = torch.randn(3, 10), torch.rand(3, 10)
    ref = soft_ce.soft_cross_entropy_reference(s, t, 0.5)
    for impl in ("auto", "torch", "triton"):  # auto on CPU tensors: the torch form
        assert rel(kernels.soft_cross_entropy(s, t, 0.5, impl=impl), ref) < 1e-5, impl
    with pytest.raises(ValueError, match="one shape"):
        kernels.soft_cross_entropy(s, t[:2], 0.5)
    with pytest.raises(ValueError, match="> 0"):
        kernels.soft_cross_entropy(s, t, 0.0)
    with pytest.raises(ValueError, match="impl"):
        kernels.soft_cross_entropy(s, t, 0.5, impl="cuda-magic")
    assert kernels.soft_cross_entropy(s[:0], t[:0], 0.5, impl="triton").shape == (0,)


def test_soft_ce_custom_ops_pass_opcheck():
    s, t = torch.randn(4, 33, requires_grad=True), torch.rand(4, 33)
    result = torch.library.opcheck(soft_ce._soft_ce_op, (s, t, None, None, None, None, 2.0))
    assert all(v == "SUCCESS" for v in result.values()), result
    row, col, shift, tinv = torch.rand(4), torch.rand(33), torch.tensor([0.5]), torch.tensor([3.0])
    result = torch.library.opcheck(soft_ce._soft_ce_op, (s, t, row, col, shift, tinv, 2.0))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("M,K,block", [(7, 37, 16), (6, 64, 64)])
def test_soft_ce_factored_targets(monkeypatch, M, K, block):
    """FactoredTargets (row x col x exp((logits - shift) x inv_temp), generated in the kernels) give what their
    written-out form gives, values and gradients; a factor of the wrong length is refused."""
    monkeypatch.setitem(soft_ce.LAUNCH, "block", block)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    scores = (torch.randn(M, K, generator=g) * 3).half().requires_grad_()
    logits = torch.randn(M, K + 5, generator=g).half()[:, 2:K + 2]  # strided rows
    t = kernels.FactoredTargets(logits, torch.rand(M, generator=g) + 0.1, torch.rand(K, generator=g) + 0.1,
                                logits.float().amax().reshape(1), torch.tensor([1 / 0.3]))
    dense = t.dense()
    assert dense.dtype == torch.float32 and dense.shape == (M, K)
    torch.testing.assert_close(dense, t.row[:, None] * t.col * torch.exp((logits.float() - t.shift) / 0.3))
    got = kernels.soft_cross_entropy(scores, t, 0.1, impl="triton")
    want = soft_ce.soft_cross_entropy_reference(scores, dense, 0.1)
    assert rel(got, want) < 1e-5
    assert torch.equal(kernels.soft_cross_entropy(scores, t, 0.1, impl="torch"), want)
    w = torch.randn(M, generator=g)
    (dg,), (dw,) = torch.autograd.grad((got * w).sum(), scores), torch.autograd.grad((want * w).sum(), scores)
    assert dg.dtype == torch.float16 and rel(dg, dw) < 2e-3
    with pytest.raises(ValueError, match="do not fit"):
        kernels.soft_cross_entropy(scores, t._replace(col=t.col[1:]), 0.1)


# ----------------------------------------------------------------------------- crop_cross_entropy (DINO's pairs)
@pytest.mark.parametrize("G,V,B,K,block", [(2, 5, 3, 37, 16), (1, 3, 2, 64, 64), (3, 4, 2, 100, 32), (2, 2, 1, 1, 16)])
def test_crop_ce_matches_the_torch_form(monkeypatch, G, V, B, K, block):
    """Every (teacher crop, student crop, image) triple: several steps a row with a ragged last one, one exact step,
    a target count that is no power of two (G = 3, padded to 4 rows in the kernels), one class; values and gradients
    for weights on every triple."""
    monkeypatch.setitem(soft_ce.LAUNCH, "block", block)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    scores = (torch.randn(V, B, K, generator=g) * 3).requires_grad_()
    targets = _targets(G * B, K, g).view(G, B, K)
    got = kernels.crop_cross_entropy(scores, targets, 0.1, impl="triton")
    want = soft_ce.crop_cross_entropy_reference(scores, targets, 0.1)
    assert got.dtype == torch.float32 and got.shape == (G, V, B)
    # the reference is the per-pair soft cross-entropy
    pair = kernels.soft_cross_entropy(scores[1 % V].detach(), targets[G - 1], 0.1, impl="torch")
    assert rel(want[G - 1, 1 % V].detach(), pair) < 1e-6
    assert rel(got, want) < 1e-5, (got, want)
    w = torch.randn(G, V, B, generator=g)
    (dg,), (dw,) = torch.autograd.grad((got * w).sum(), scores), torch.autograd.grad((want * w).sum(), scores)
    assert rel(dg, dw) < 1e-5 or dw.abs().max() < 1e-6


def test_crop_ce_factored_16_bit_and_dino_weights(monkeypatch):
    """fp16 scores, Sinkhorn's FactoredTargets over [G * B, K] rows (never written out) against their dense form;
    DINO's weighting (pairs of different crops only) gives the engine's torch loss."""
    monkeypatch.setitem(soft_ce.LAUNCH, "block", 32)
    from engine.objectives.dinov2 import dino_loss

    G, V, B, K = 2, 6, 3, 70
    g = torch.Generator().manual_seed(11)
    scores = (torch.randn(V, B, K, generator=g) * 2).half().requires_grad_()
    t = kernels.sinkhorn_knopp(torch.randn(G * B, K, generator=g).half(), 0.07, 3, factored=True, impl="torch")
    dense = t.dense().view(G, B, K)
    got = kernels.crop_cross_entropy(scores, t, 0.1, impl="triton")
    assert torch.equal(kernels.crop_cross_entropy(scores, t, 0.1, impl="torch"),
                       soft_ce.crop_cross_entropy_reference(scores, dense, 0.1))
    different = ~torch.eye(G, V, dtype=torch.bool)
    loss = (got.mean(-1) * different).sum() / different.sum()
    want = dino_loss(scores, dense, 0.1)
    assert abs(loss.item() - want.item()) < 1e-4 * abs(want.item())
    (dg,), (dw,) = torch.autograd.grad(loss, scores), torch.autograd.grad(want, scores)
    assert dg.dtype == torch.float16 and rel(dg, dw) < 2e-3


def test_crop_ce_dispatch_and_checks():
    s, t = torch.randn(4, 3, 10), torch.rand(2, 3, 10)
    ref = soft_ce.crop_cross_entropy_reference(s, t, 0.5)
    for impl in ("auto", "torch", "triton"):  # auto on CPU tensors: the torch form
        assert rel(kernels.crop_cross_entropy(s, t, 0.5, impl=impl), ref) < 1e-5, impl
    with pytest.raises(ValueError, match=r"\[V, B, K\]"):
        kernels.crop_cross_entropy(s[0], t, 0.5)
    with pytest.raises(ValueError, match=r"\[G, B, K\]"):
        kernels.crop_cross_entropy(s, t[:, :2], 0.5)
    with pytest.raises(ValueError, match="> 0"):
        kernels.crop_cross_entropy(s, t, -1.0)
    f = kernels.FactoredTargets(torch.randn(5, 10), torch.rand(5), torch.rand(10), torch.zeros(1), torch.ones(1))
    with pytest.raises(ValueError, match=r"\[G \* B, K\]"):  # 5 rows are no whole number of 3-image crops
        kernels.crop_cross_entropy(s, f, 0.5)
    assert kernels.crop_cross_entropy(s[:0], t, 0.5, impl="triton").shape == (2, 0, 3)


def test_crop_ce_custom_ops_pass_opcheck():
    s, t = torch.randn(6, 33, requires_grad=True), torch.rand(4, 33)  # V = 3, B = 2, G = 2
    result = torch.library.opcheck(soft_ce._crop_ce_op, (s, t, None, None, None, None, 2, 2.0))
    assert all(v == "SUCCESS" for v in result.values()), result
    row, col, shift, tinv = torch.rand(4), torch.rand(33), torch.tensor([0.5]), torch.tensor([3.0])
    result = torch.library.opcheck(soft_ce._crop_ce_op, (s, t, row, col, shift, tinv, 2, 2.0))
    assert all(v == "SUCCESS" for v in result.values()), result
