"""kernels.mae_mask / mae_unmask / mae_loss: Triton (TRITON_INTERPRET=1) against the torch references."""
import collections
import sys

import pytest
import torch

from tests.kernel_helpers import interpreted_kernels, zero_fills

kernels = interpreted_kernels()


@pytest.mark.parametrize("B,N,C,ratio", [(3, 50, 40, 0.75), (2, 197, 24, 0.75), (2, 261, 8, 0.5), (2, 7, 8, 0.0),
                                         (1, 1, 8, 0.0)])
@pytest.mark.parametrize("pos_shape", ["1NC", "NC"])
def test_mae_mask_matches_reference(B, N, C, ratio, pos_shape):
    tokens = torch.randn(B, N, C, requires_grad=True)
    pos = torch.randn((1, N, C) if pos_shape == "1NC" else (N, C), requires_grad=True)
    noise = torch.rand(B, N)
    vis, ids, mask = kernels.mae_mask(tokens, pos, ratio, noise=noise, impl="triton")
    rvis, rids, rmask = kernels.mae_mask_reference(tokens, pos, ratio, noise=noise)
    K = int(N * (1 - ratio))
    assert vis.shape == (B, K, C) and ids.shape == (B, K) and ids.dtype == torch.int64
    assert mask.dtype == torch.bool and mask.shape == (B, N) and mask.sum().item() == B * (N - K)
    assert torch.equal(ids, rids) and torch.equal(mask, rmask)
    # the keep set is the K smallest noise values, in increasing order
    assert torch.equal(ids, torch.sort(noise, dim=1, stable=True).indices[:, :K])
    torch.testing.assert_close(vis, rvis)
    g = torch.randn_like(vis)
    got = torch.autograd.grad(vis, (tokens, pos), g)
    want = torch.autograd.grad(rvis, (tokens, pos), g)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_mae_mask_ties_and_rng():
    tokens, pos = torch.randn(2, 9, 4), torch.randn(9, 4)
    noise = torch.tensor([[0.5] * 9, [0.3, 0.1, 0.3, 0.1, 0.9, 0.0, 0.3, 0.1, 0.2]])
    _, ids, _ = kernels.mae_mask(tokens, pos, 0.5, noise=noise, impl="triton")
    assert ids.tolist() == [[0, 1, 2, 3], [5, 1, 3, 7]]
    # without noise: torch's global RNG decides, so reseeding reproduces the keep set
    torch.manual_seed(3)
    a = kernels.mae_mask(tokens, pos, 0.75, impl="triton")[1]
    torch.manual_seed(3)
    b = kernels.mae_mask(tokens, pos, 0.75, impl="torch")[1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("rank_by", ["count", "sort"])
@pytest.mark.parametrize("B,N,K", [(3, 196, 49), (2, 7, 3), (1, 1, 1), (2, 261, 0), (1, 1374, 343)])
def test_rank_methods_give_the_stable_argsort(monkeypatch, rank_by, B, N, K):
    """Both rank kernels (counting, and one sort of position-tagged integer keys per sample) give argsort's
    stable order: ties broken by position, -0.0 tying +0.0, negative and infinite noise in float order."""
    masking = sys.modules["kernels.masking"]
    monkeypatch.setattr(masking, "RANK_BY", rank_by)
    g = torch.Generator().manual_seed(N)
    noise = torch.rand(B, N, generator=g)
    noise[0, ::3] = 0.25  # ties
    if N > 6:
        noise[-1, :6] = torch.tensor([0.0, -0.0, -1.5, float("inf"), -2.0, -0.0])
    order = torch.sort(noise, dim=1, stable=True).indices
    ids, mask, rank = masking.mae_rank(noise, K)
    assert torch.equal(ids, order[:, :K])
    assert torch.equal(rank, torch.argsort(order, dim=1).to(torch.int32))
    assert torch.equal(mask, rank >= K)


def test_mae_mask_pos_without_grad_and_dtype():
    tokens = torch.randn(2, 16, 8, requires_grad=True)
    pos = torch.randn(1, 16, 8)  # MAE's fixed sin-cos embedding
    vis, _, _ = kernels.mae_mask(tokens, pos, 0.75, impl="triton")
    (g,) = torch.autograd.grad(vis.sum(), tokens)
    assert g.sum().item() == pytest.approx(2 * 4 * 8)
    v16 = kernels.mae_mask(tokens.detach().half(), pos, 0.75, impl="triton")[0]
    assert v16.dtype == torch.float32  # promoted like tokens + pos_embed


@pytest.mark.parametrize("B,N,C,ratio", [(3, 50, 40, 0.75), (2, 197, 24, 0.75), (2, 5, 300, 0.4), (1, 1, 8, 0.0)])
@pytest.mark.parametrize("mt_shape", ["C", "11C"])
def test_mae_unmask_matches_reference(B, N, C, ratio, mt_shape):
    K = int(N * (1 - ratio))
    ids = torch.argsort(torch.rand(B, N), 1)[:, :K]
    vis = torch.randn(B, K, C, requires_grad=True)
    mt = torch.randn((C,) if mt_shape == "C" else (1, 1, C), requires_grad=True)
    pos = torch.randn(1, N, C, requires_grad=True)
    full = kernels.mae_unmask(vis, ids, mt, pos, impl="triton")
    ref = kernels.mae_unmask_reference(vis, ids, mt, pos)
    torch.testing.assert_close(full, ref)
    # kept positions hold their visible token, the rest the mask token (before pos_embed)
    b = B - 1
    torch.testing.assert_close(full[b, ids[b]] - pos[0, ids[b]], vis[b])
    g = torch.randn_like(full)
    got = torch.autograd.grad(full, (vis, mt, pos), g)
    want = torch.autograd.grad(ref, (vis, mt, pos), g)
    for a, w in zip(got, want):
        assert a.shape == w.shape
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,N,C,ratio", [(3, 50, 40, 0.75), (9, 197, 24, 0.75), (2, 5, 300, 0.4)])
def test_mae_unmask_fixed_pos_embed(B, N, C, ratio):
    """MAE's decoder pos_embed is a fixed sin-cos buffer: the backward then skips its sum over the
    batch (HAS_DPOS off, wider walk steps) and still gives the reference's dvisible and dmask_token."""
    K = int(N * (1 - ratio))
    ids = torch.argsort(torch.rand(B, N), 1)[:, :K]
    vis = torch.randn(B, K, C, requires_grad=True)
    mt = torch.randn(C, requires_grad=True)
    pos = torch.randn(1, N, C)
    full = kernels.mae_unmask(vis, ids, mt, pos, impl="triton")
    ref = kernels.mae_unmask_reference(vis, ids, mt, pos)
    torch.testing.assert_close(full, ref)
    g = torch.randn_like(full)
    got = torch.autograd.grad(full, (vis, mt), g)
    want = torch.autograd.grad(ref, (vis, mt), g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


def test_mask_unmask_roundtrip():
    tokens, pos = torch.randn(2, 30, 6), torch.zeros(1, 30, 6)
    vis, ids, mask = kernels.mae_mask(tokens, pos, 0.6, impl="triton")
    full = kernels.mae_unmask(vis, ids, torch.full((6,), 7.0), pos, impl="triton")
    torch.testing.assert_close(full[~mask], tokens[~mask])
    assert (full[mask] == 7.0).all()


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("C,p,H,W", [(3, 16, 32, 48), (1, 14, 28, 14), (3, 4, 12, 8)])
def test_mae_loss_matches_reference(norm_pix, C, p, H, W):
    g, mask = _loss_vs_reference(norm_pix, 2, C, p, H, W, strided=False)
    assert (g[~mask] == 0).all()


@pytest.mark.parametrize("C,p,H,W,strided", [(3, 16, 32, 48, False), (1, 14, 28, 14, True), (3, 4, 12, 8, True)])
def test_mae_loss_channel_major_layout(C, p, H, W, strided):
    """layout="cpq": pred holds each patch channel by channel, rows as in the image. The kernel matches the
    reference in that layout (loss and gradient, strided pred too), and a pred permuted from MAE's order
    into it gives the same loss, with the gradient permuted the same way."""
    N = (H // p) * (W // p)
    imgs = torch.randn(2, C, H, W) * 2 + 0.5
    leaf = torch.randn(2, N, p * p * C + (8 if strided else 0), requires_grad=True)
    pred = leaf[:, :, 4:4 + p * p * C] if strided else leaf
    mask = torch.rand(2, N) < 0.6
    mask[0, 0] = True
    g = _assert_loss_matches(imgs, pred, mask, p, 1.5, leaf, layout="cpq")
    # pixel (c, pi, pj) of patch (i, j) sits at (c*p + pi)*p + pj
    t = kernels.patchify(imgs, p, "cpq")
    assert t[0, 0, (min(C, 2) - 1) * p * p + 2 * p + 3] == imgs[0, min(C, 2) - 1, 2, 3]
    mae = torch.randn(2, N, p * p * C, requires_grad=True)
    perm = kernels.patchify(torch.arange(C * p * p, dtype=torch.float64).reshape(C, p, p)[None], p, "pqc")[0, 0]
    cpq = torch.empty_like(mae).index_copy(2, perm.long(), mae.detach()).requires_grad_()
    a = kernels.mae_loss(imgs, mae, mask, p, impl="triton")
    b = kernels.mae_loss(imgs, cpq, mask, p, impl="triton", layout="cpq")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    (ga,) = torch.autograd.grad(a, mae)
    (gb,) = torch.autograd.grad(b, cpq)
    torch.testing.assert_close(gb[..., perm.long()], ga, rtol=1e-6, atol=1e-8)
    assert (g[..., 4:4 + p * p * C] if strided else g)[~mask].abs().sum() == 0
    with pytest.raises(ValueError, match="pqc, cpq"):
        kernels.mae_loss(imgs, pred, mask, p, impl="triton", layout="qpc")


def _assert_loss_matches(imgs, pred, mask, p, scale=1.0, leaf=None, **kw):
    """The Triton loss and its gradient (of scale * loss, w.r.t. `leaf`, default pred) match the
    torch reference's; returns the kernel's gradient."""
    leaf = pred if leaf is None else leaf
    loss = kernels.mae_loss(imgs, pred, mask, p, impl="triton", **kw)
    ref = kernels.mae_loss_reference(imgs, pred, mask, p, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss * scale, leaf)
    (gr,) = torch.autograd.grad(ref * scale, leaf)
    torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-7)
    return g


def _loss_vs_reference(norm_pix, B, C, p, H, W, strided):
    """Loss and d(pred) of the Triton kernel vs the torch reference on fresh inputs; pred is a
    slice of wider rows when `strided`. Returns the kernel's gradient and the mask."""
    N = (H // p) * (W // p)
    imgs = torch.randn(B, C, H, W) * 2 + 0.5
    leaf = torch.randn(B, N, p * p * C + (8 if strided else 0), requires_grad=True)
    pred = leaf[:, :, 4:4 + p * p * C] if strided else leaf
    mask = torch.rand(B, N) < 0.6
    mask[0, 0] = True
    return _assert_loss_matches(imgs, pred, mask, p, 2.5, leaf, norm_pix=norm_pix), mask


def test_mae_loss_float_mask_and_patchify_order():
    imgs = torch.randn(1, 3, 8, 8)
    p = 4
    target = kernels.patchify(imgs, p)
    # pred[b, i*w + j, (pi*p + pj)*C + c] is pixel (c, i*p + pi, j*p + pj)
    assert target[0, 1 * 2 + 0, (2 * p + 3) * 3 + 1] == imgs[0, 1, 1 * p + 2, 0 * p + 3]
    pred = torch.randn(1, 4, 48, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 0.5, 1.0]])
    a = kernels.mae_loss(imgs, pred, mask, p, impl="triton")
    b = kernels.mae_loss_reference(imgs, pred, mask, p)
    torch.testing.assert_close(a, b)
    # a perfect prediction of the normalized patch gives zero loss
    t = kernels.patchify(imgs, p)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    assert kernels.mae_loss(imgs, t, mask, p, impl="triton").item() < 1e-10
    with pytest.raises(ValueError):
        kernels.mae_loss(imgs, pred[:, :3], mask[:, :3], p, impl="triton")


@pytest.mark.parametrize("B,N,C,ratio", [(5, 197, 72, 0.75), (3, 7, 1100, 0.5), (2, 5, 8, 0.0)])
def test_unmask_from_the_masks_rank(B, N, C, ratio):
    """mae_unmask(rank=...): each position's row read from mae_rank's output for the same noise instead of found by
    comparing with ids_keep gives the same output, inverse and gradients."""
    masking = sys.modules["kernels.masking"]
    K = int(N * (1 - ratio))
    ids, _, rank = masking.mae_rank(torch.rand(B, N), K)
    assert rank.dtype == torch.int32 and ((rank < K).sum(1) == K).all()
    for pos_grad in (False, True):
        _assert_unmask_matches(ids, torch.randn(1, N, C, requires_grad=pos_grad), C, rank=rank)


@pytest.mark.parametrize("B,N,C,ratio", [(5, 197, 72, 0.75), (2, 10, 1408, 0.75), (11, 5, 48, 0.6), (2, 7, 8, 0.9),
                                         (2, 5, 8, 0.0), (3, 1, 16, 0.0)])
@pytest.mark.parametrize("split", [True, False])
def test_unmask_with_the_mask(monkeypatch, B, N, C, ratio, split):
    """mae_unmask(mask=...), what the engine calls: visible rows scattered and masked positions filled by separate
    programs. Same output, inverse (what the backward walks) and gradients as the reference, at 1408 columns (several
    column tiles) and with no or one position masked; with UNMASK_SPLIT off (the bench's variant) the mask is
    ignored and the ids compared, with the same results."""
    masking = sys.modules["kernels.masking"]
    monkeypatch.setattr(masking, "UNMASK_SPLIT", split)
    K = int(N * (1 - ratio))
    _, ids, mask = kernels.mae_mask(torch.randn(B, N, 4), torch.zeros(N, 4), ratio, impl="triton")
    for pos_grad in (False, True):
        _assert_unmask_matches(ids, torch.randn(1, N, C, requires_grad=pos_grad), C, mask=mask)
    assert ids.shape == (B, K)


def test_unmask_native_add_is_exact(monkeypatch):
    """With visible rows, mask token and pos_embed in one 16-bit dtype the unmask forward adds in that dtype
    (UNMASK_NATIVE_ADD): bit for bit the fp32 path's output and the torch reference's (one rounding of the exact sum),
    with large and tiny magnitudes mixed so that the sums round. In fp16: the interpreter's bf16 arithmetic is wrong
    (as its bf16 tl.dot), and its fp32 -> bf16 conversion truncates; bf16 was compared on the GPU
    (bench/results/kernels-nvidia-h200-2026-11-29-unmask-native.json)."""
    dtype = torch.float16
    masking = sys.modules["kernels.masking"]
    B, N, C = 3, 20, 40
    _, ids, mask = kernels.mae_mask(torch.randn(B, N, 4), torch.zeros(N, 4), 0.75, impl="triton")
    scale = torch.logspace(-4, 4, C)  # inside fp16's range
    vis = (torch.randn(B, ids.shape[1], C) * scale).to(dtype)
    mt = (torch.randn(C) * scale.flip(0)).to(dtype)
    pos = (torch.randn(1, N, C) * scale.flip(0)).to(dtype)
    outs = []
    for native in (True, False):
        monkeypatch.setattr(masking, "UNMASK_NATIVE_ADD", native)
        outs.append(kernels.mae_unmask(vis, ids, mt, pos, mask=mask, impl="triton"))
    ref = kernels.mae_unmask_reference(vis, ids, mt, pos)
    assert outs[0].dtype == dtype and torch.equal(outs[0], outs[1]) and torch.equal(outs[0], ref)
    assert masking._native_add_ok(vis, mt, pos) and not masking._native_add_ok(vis, mt.float(), pos)
    # bf16 on CPU (the interpreter) keeps the fp32 path: the interpreter's bf16 arithmetic is wrong
    assert not masking._native_add_ok(vis.bfloat16(), mt.bfloat16(), pos.bfloat16())


@pytest.mark.parametrize("launch", [(1, 1, 1), (4, 8, 4), (16, 32, 8)])
def test_unmask_split_launch_shapes(monkeypatch, launch):
    """The split forward's (visible rows per scatter program, positions per fill program, warps): a last program of
    each kind only partly used, or one row each."""
    masking = sys.modules["kernels.masking"]
    monkeypatch.setitem(masking.LAUNCH, "unmask_split", launch)
    B, N, C = 13, 23, 24
    _, ids, mask = kernels.mae_mask(torch.randn(B, N, 4), torch.zeros(N, 4), 0.7, impl="triton")
    _assert_unmask_matches(ids, torch.randn(1, N, C, requires_grad=True), C, mask=mask)


def test_unmask_mask_shape_and_device_are_checked():
    ids = torch.argsort(torch.rand(2, 6), 1)[:, :3]
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match="mask"):
            kernels.mae_unmask(torch.randn(2, 3, 8), ids, torch.randn(8), torch.randn(6, 8),
                               mask=torch.ones(2, 5, dtype=torch.bool), impl=impl)
        with pytest.raises(ValueError, match="mask is on meta"):
            kernels.mae_unmask(torch.randn(2, 3, 8), ids, torch.randn(8), torch.randn(6, 8),
                               mask=torch.ones(2, 6, dtype=torch.bool, device="meta"), impl=impl)


def test_custom_ops_pass_opcheck():
    # schema, fake-tensor shapes/strides, autograd registration: what torch.compile relies on
    masking = sys.modules["kernels.masking"]
    loss = sys.modules["kernels.loss"]
    B, N, C, K = 2, 12, 8, 5
    noise = torch.rand(B, N)
    ids, mask, rank = masking.mae_rank(noise, K)
    cases = [
        (masking.mae_rank, (noise, K)),
        (masking._gather_ranked, (torch.randn(B, N, C, requires_grad=True), torch.randn(N, C, requires_grad=True),
                                  ids, rank)),
        (masking._unmask, (torch.randn(B, K, C, requires_grad=True), ids, torch.randn(C, requires_grad=True),
                           torch.randn(N, C, requires_grad=True))),
        (masking._unmask, (torch.randn(B, K, C, requires_grad=True), ids, torch.randn(C, requires_grad=True),
                           torch.randn(N, C, requires_grad=True), rank)),
        (masking._unmask, (torch.randn(B, K, C, requires_grad=True), ids, torch.randn(C, requires_grad=True),
                           torch.randn(N, C), None, mask)),
        (loss._loss_op, (torch.randn(B, 3, 8, 12), torch.randn(B, 6, 48, requires_grad=True),
                         (torch.rand(B * 6) < 0.5).float(), 4, True, 1e-6, False)),
        (loss._loss_op, (torch.randn(B, 3, 8, 12), torch.randn(B, 6, 48, requires_grad=True),
                         (torch.rand(B * 6) < 0.5).float(), 4, True, 1e-6, True)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_torch_compile_sees_one_graph():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    B, N, C, p = 2, 6, 48, 4
    tokens = torch.randn(B, N, C, requires_grad=True)
    pos = torch.randn(1, N, C, requires_grad=True)
    mt = torch.randn(C, requires_grad=True)
    imgs = torch.randn(B, 3, 8, 12)
    noise = torch.rand(B, N)

    def step(tokens, pos, mt, impl):
        vis, ids, mask = kernels.mae_mask(tokens, pos, 0.5, noise=noise, impl=impl)
        full = kernels.mae_unmask(vis * 2, ids, mt, pos, impl=impl)
        return kernels.mae_loss(imgs, full, mask, p, impl=impl)

    got = torch.compile(step, backend="aot_eager")(tokens, pos, mt, "triton")
    g = torch.autograd.grad(got, (tokens, pos, mt))
    want = step(tokens, pos, mt, "torch")
    gw = torch.autograd.grad(want, (tokens, pos, mt))
    torch.testing.assert_close(got, want)
    for a, b in zip(g, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not torch._dynamo.utils.counters["graph_break"]


def _assert_same_grads(out, ref, inputs):
    """One random upstream gradient through the kernel's output and the reference's: equal input grads."""
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _assert_unmask_matches(ids, pos, C, rank=None, mask=None):
    """mae_unmask (Triton) on random visible rows and mask token against the reference: the output, the inverse
    its forward saves (each position's row in `visible`, -1 where masked) and the gradients (pos_embed's when it
    needs one). pos: [1, N, C]."""
    masking = sys.modules["kernels.masking"]
    B, K = ids.shape
    N = pos.shape[1]
    v = torch.randn(B, K, C, requires_grad=True)
    mt = torch.randn(C, requires_grad=True)
    full = kernels.mae_unmask(v, ids, mt, pos, rank=rank, mask=mask, impl="triton")
    ref = kernels.mae_unmask_reference(v, ids, mt, pos)
    torch.testing.assert_close(full, ref)
    inv = masking._unmask(v.detach(), ids, mt.detach(), pos.detach()[0], rank, mask)[1]
    want = torch.full((B, N), -1, dtype=torch.int32)
    want.scatter_(1, ids, torch.arange(K, dtype=torch.int32).expand(B, K).contiguous())
    assert torch.equal(inv, want)
    _assert_same_grads(full, ref, (v, mt, pos) if pos.requires_grad else (v, mt))


# --- paths of the bandwidth-tuned kernels: batch chunks with a partial last step, column tiles
# of a non-power-of-two width (ViT-g's 1408 -> 128-wide tiles), K past one id block, K = 0


@pytest.mark.parametrize("B,N,C,ratio", [(11, 5, 48, 0.6), (2, 10, 1408, 0.75), (3, 150, 8, 1 / 3), (2, 7, 8, 0.9)])
@pytest.mark.parametrize("evict", [False, True])
def test_mae_mask_unmask_walks(monkeypatch, B, N, C, ratio, evict):
    """The mask's gather and the unmask's scatter / fill and both backward walks match the reference, with and without
    the L2 eviction hints on their loads (MASK_EVICT / UNMASK_EVICT; the interpreter runs the same loads)."""
    monkeypatch.setattr(sys.modules["kernels.masking"], "MASK_EVICT", evict)
    monkeypatch.setattr(sys.modules["kernels.masking"], "UNMASK_EVICT", evict)
    K = int(N * (1 - ratio))
    tokens = torch.randn(B, N, C, requires_grad=True)
    pos = torch.randn(1, N, C, requires_grad=True)
    noise = torch.rand(B, N)
    vis, ids, mask = kernels.mae_mask(tokens, pos, ratio, noise=noise, impl="triton")
    rvis, rids, rmask = kernels.mae_mask_reference(tokens, pos, ratio, noise=noise)
    assert torch.equal(ids, rids) and torch.equal(mask, rmask) and vis.shape == (B, K, C)
    torch.testing.assert_close(vis, rvis)
    _assert_same_grads(vis, rvis, (tokens, pos))
    _assert_unmask_matches(ids, pos, C)
    _assert_unmask_matches(ids, pos, C, mask=mask)


@pytest.mark.parametrize("programs", [1, 3])
def test_mae_backward_long_walks(monkeypatch, programs):
    # few programs: each walks many steps (ranks / inv loaded a step ahead), last step partial
    masking = sys.modules["kernels.masking"]
    monkeypatch.setattr(masking, "WALK_PROGRAMS", programs)
    B, N, C = 19, 6, 24
    for ratio in (0.5, 0.0):
        K = int(N * (1 - ratio))
        tokens = torch.randn(B, N, C, requires_grad=True)
        pos = torch.randn(N, C, requires_grad=True)
        noise = torch.rand(B, N)
        vis, ids, _ = kernels.mae_mask(tokens, pos, ratio, noise=noise, impl="triton")
        rvis = kernels.mae_mask_reference(tokens, pos, ratio, noise=noise)[0]
        _assert_same_grads(vis, rvis, (tokens, pos))
        v = torch.randn(B, K, C, requires_grad=True)
        mt = torch.randn(C, requires_grad=True)
        full = kernels.mae_unmask(v, ids, mt, pos, impl="triton")
        ref = kernels.mae_unmask_reference(v, ids, mt, pos)
        _assert_same_grads(full, ref, (v, mt, pos))


@pytest.mark.parametrize("programs", [1, 512])
def test_parameter_grads_come_back_in_their_dtypes(monkeypatch, programs):
    """pos_embed / mask_token in half precision beside fp32 tokens: their gradients are summed in fp32 and
    stored in the parameters' own dtypes by the kernels (no cast kernels after), with one batch chunk (the walk
    writes dpos itself) and with several (the reduction kernel does)."""
    masking = sys.modules["kernels.masking"]
    monkeypatch.setattr(masking, "WALK_PROGRAMS", programs)
    B, N, C, ratio = 9, 12, 16, 0.5
    noise = torch.rand(B, N)
    tokens = torch.randn(B, N, C, requires_grad=True)
    for dt in (torch.bfloat16, torch.float16):
        pos = torch.randn(N, C).to(dt).requires_grad_()
        vis = kernels.mae_mask(tokens, pos, ratio, noise=noise, impl="triton")[0]
        rvis = kernels.mae_mask_reference(tokens, pos, ratio, noise=noise)[0]
        g = torch.randn_like(vis)
        got = torch.autograd.grad(vis, (tokens, pos), g)
        want = torch.autograd.grad(rvis, (tokens, pos), g)
        assert got[1].dtype == dt and got[0].dtype == torch.float32
        torch.testing.assert_close(got[1].float(), want[1].float(), rtol=1e-2, atol=1e-2)
        ids = kernels.mae_mask(tokens, pos, ratio, noise=noise, impl="triton")[1]
        v = torch.randn(B, N // 2, C, requires_grad=True)
        mt = torch.randn(C).to(dt).requires_grad_()
        full = kernels.mae_unmask(v, ids, mt, pos, impl="triton")
        ref = kernels.mae_unmask_reference(v, ids, mt, pos)
        gf = torch.randn_like(full)
        got = torch.autograd.grad(full, (v, mt, pos), gf)
        want = torch.autograd.grad(ref, (v, mt, pos), gf)
        assert [t.dtype for t in got] == [torch.float32, dt, dt]
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("walk", [(8, 4), (2, 16)])
def test_unmask_walk_steps(monkeypatch, walk):
    """Other samples-per-step of the unmask backward walk (LAUNCH["unmask_walk"]: with a learnable pos_embed, with a
    fixed one; the bench's LEARNABLE_WALK_VARIANTS), with few programs so each walks several steps: the reference's
    gradients."""
    masking = sys.modules["kernels.masking"]
    monkeypatch.setitem(masking.LAUNCH, "unmask_walk", walk)
    monkeypatch.setattr(masking, "WALK_PROGRAMS", 5)
    B, N, C, K = 37, 10, 24, 4
    ids, mask, _ = masking.mae_rank(torch.rand(B, N), K)
    for pos_grad in (True, False):
        _assert_unmask_matches(ids, torch.randn(1, N, C, requires_grad=pos_grad), C, mask=mask)


def test_walk_configs_cover_the_batch():
    masking = sys.modules["kernels.masking"]
    for B, N, C, bb in [(256, 196, 1024, 8), (256, 196, 512, 4), (11, 5, 48, 8), (1, 1370, 1408, 4), (3, 7, 8, 4)]:
        bb_, bn, bc, bchunk, nchunks = masking._walk_config(B, N, C, bb)
        assert bchunk % bb == 0 and (nchunks - 1) * bchunk < B <= nchunks * bchunk
    assert masking._walk_config(256, 196, 1024, 8)[4] == 3 and masking._col_block(1408, 256) == 128


@pytest.mark.parametrize("C,p,H,W", [(3, 8, 16, 24), (2, 16, 16, 32), (4, 4, 8, 8), (1, 32, 32, 64), (5, 4, 8, 8)])
def test_mae_loss_channels_and_patch_sizes(C, p, H, W):
    # G = B * N not a multiple of the patches per program; C = 5 falls back to the reference
    B = 1
    N = (H // p) * (W // p)
    imgs = torch.randn(B, C, H, W) * 3 - 1
    pred = torch.randn(B, N, p * p * C, requires_grad=True)
    mask = torch.rand(B, N) < 0.7
    mask[0, 0] = True
    _assert_loss_matches(imgs, pred, mask, p)


def test_mae_loss_strided_bf16_and_bool_mask():
    B, C, p, H, W = 2, 3, 16, 32, 48
    N = (H // p) * (W // p)
    imgs = (torch.randn(B, C, H, W) * 2).to(memory_format=torch.channels_last)  # image strides (H*W*C, 1, W*C, C)
    pred = torch.randn(B, N, p * p * C, requires_grad=True)
    mask = torch.rand(B, N) < 0.75
    mask[1, 2] = True
    _assert_loss_matches(imgs, pred, mask, p, 0.5)
    # bf16 in, fp32 statistics: against the fp32 reference on the same rounded inputs
    i16, p16 = imgs.bfloat16(), pred.detach().bfloat16().requires_grad_()
    l16 = kernels.mae_loss(i16, p16, mask, p, impl="triton")
    r16 = kernels.mae_loss_reference(i16.float(), p16.float(), mask, p)
    torch.testing.assert_close(l16, r16, rtol=1e-4, atol=1e-5)
    (g16,) = torch.autograd.grad(l16, p16)
    (gr16,) = torch.autograd.grad(r16, p16)
    assert g16.dtype == torch.bfloat16
    torch.testing.assert_close(g16.float(), gr16.float(), rtol=1e-2, atol=1e-5)


def test_mask_and_gather_bwd_ops_pass_opcheck():
    masking = sys.modules["kernels.masking"]
    loss = sys.modules["kernels.loss"]
    B, N, C, K = 11, 5, 16, 2
    ids, _, rank = masking.mae_rank(torch.rand(B, N), K)
    inv = masking._unmask(torch.randn(B, K, C), ids, torch.randn(C), torch.randn(N, C))[1]
    cases = [
        (masking._gather_bwd, (torch.randn(B, K, C), rank, torch.float32, True)),
        (masking._gather_bwd, (torch.randn(B, K, C), rank, torch.float32, False)),
        (masking._unmask_bwd, (torch.randn(B, N, C), inv, K, torch.float32)),
        (masking._unmask_bwd, (torch.randn(B, N, C), inv, K, torch.float32, False)),
        (loss._loss_op, (torch.randn(2, 3, 8, 12), torch.randn(2, 6, 48, requires_grad=True),
                         torch.rand(12) < 0.5, 4, True, 1e-6, False)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)



# --- the loss kernel's paths: strided (sliced) pred rows, G = B * N not a multiple of the
# patches per program, P * P not a power of two (14, 6), 1-4 channels, float mask weights


@pytest.mark.parametrize("norm_pix,B,C,p,H,W", [(True, 2, 3, 16, 32, 48), (False, 2, 3, 16, 32, 48),
                                                (True, 3, 1, 14, 28, 14), (True, 1, 2, 6, 12, 18),
                                                (True, 1, 4, 4, 8, 12), (False, 2, 3, 4, 12, 8)])
def test_mae_loss_strided_pred(norm_pix, B, C, p, H, W):
    _loss_vs_reference(norm_pix, B, C, p, H, W, strided=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the 0 / 0, interpreted
def test_mae_loss_float_mask_channels_last_and_empty():
    imgs = torch.randn(1, 3, 8, 8).to(memory_format=torch.channels_last)
    pred = torch.randn(1, 4, 48, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 0.5, 1.0]])
    a = kernels.mae_loss(imgs, pred, mask, 4, impl="triton")
    b = kernels.mae_loss_reference(imgs, pred, mask, 4)
    torch.testing.assert_close(a, b)
    (g,) = torch.autograd.grad(a, pred)
    (gr,) = torch.autograd.grad(b, pred)
    torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-7)
    # no masked patch: 0 / 0 as the reference
    none = torch.zeros(1, 4, dtype=torch.bool)
    assert kernels.mae_loss(imgs, pred, none, 4, impl="triton").isnan()


def test_loss_bwd_op_passes_opcheck():
    loss = sys.modules["kernels.loss"]
    B = 3
    for m in (torch.rand(B * 6) < 0.5, (torch.rand(B * 6) < 0.5).float()):
        for cpq in (False, True):
            args = (torch.ones(()), m.float().sum(), torch.randn(B, 3, 8, 12), torch.randn(B, 6, 48), m, 4, True, 1e-6,
                    cpq)
            result = torch.library.opcheck(loss._loss_bwd_op, args)
            assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("gather,unmask,sum_mt,C", [((16, 8), (32, 8), (8, 256), 72), ((2, 4), (4, 4), (64, 64), 72),
                                                ((4, 4), (8, 4), (128, 32), 1100), ((4, 4), (8, 4), (512, 8), 72)])
@pytest.mark.parametrize("pos_grad", [False, True])
def test_masking_launch_shapes(monkeypatch, gather, unmask, sum_mt, C, pos_grad):
    """Other launch shapes of the gather / unmask forwards and the mask-token sum (the ones the
    bench's --mae-variants times; C = 1100 takes two column blocks) give the reference's outputs
    and gradients."""
    masking = sys.modules["kernels.masking"]
    for key, value in (("gather", gather), ("unmask", unmask), ("sum_mt", sum_mt)):
        monkeypatch.setitem(masking.LAUNCH, key, value)
    B, N = 5, 197
    tokens = torch.randn(B, N, C, requires_grad=True)
    pos = torch.randn(1, N, C, requires_grad=pos_grad)
    noise = torch.rand(B, N)
    noise[1, 3:9] = noise[1, 2]  # ties: broken by position, as the stable argsort
    vis, ids, mask = kernels.mae_mask(tokens, pos, 0.75, noise=noise, impl="triton")
    rvis, rids, rmask = kernels.mae_mask(tokens, pos, 0.75, noise=noise, impl="torch")
    assert torch.equal(ids, rids) and torch.equal(mask, rmask)
    torch.testing.assert_close(vis, rvis)
    g = torch.randn_like(vis)
    leaves = (tokens, pos) if pos_grad else (tokens,)
    for a, w in zip(torch.autograd.grad(vis, leaves, g), torch.autograd.grad(rvis, leaves, g)):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
    v = torch.randn(B, ids.shape[1], C, requires_grad=True)
    mt = torch.randn(C, requires_grad=True)
    full = kernels.mae_unmask(v, ids, mt, pos, impl="triton")
    ref = kernels.mae_unmask_reference(v, ids, mt, pos)
    torch.testing.assert_close(full, ref)
    gf = torch.randn_like(full)
    # dmask_token sums ~740 rows of N(0, 1) in another order than torch: entries that cancel to
    # ~0.1 carry fp32 rounding of ~3e-5 (seen at one seed in 25), hence atol 1e-4
    for a, w in zip(torch.autograd.grad(full, (v, mt), gf), torch.autograd.grad(ref, (v, mt), gf)):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("hoist", [True, False])
@pytest.mark.parametrize("B,N,C,ratio", [(5, 197, 72, 0.75), (3, 7, 1100, 0.5), (2, 5, 8, 0.0)])
def test_unmask_forward_load_orders(monkeypatch, hoist, B, N, C, ratio):
    """The unmask forward with its pos_embed / mask-token loads before the ids compare (the default) and after it
    (the bench's variant UNMASK_HOIST=False) give the reference's outputs, inverse and gradients, with and without
    a pos_embed gradient; C = 1100 takes two column blocks (inv written once), ratio 0 keeps every row."""
    masking = sys.modules["kernels.masking"]
    monkeypatch.setattr(masking, "UNMASK_HOIST", hoist)
    K = int(N * (1 - ratio))
    ids = torch.stack([torch.randperm(N)[:K] for _ in range(B)])
    for pos_grad in (False, True):
        _assert_unmask_matches(ids, torch.randn(1, N, C, requires_grad=pos_grad), C)


def test_pdl_only_on_hopper_cuda_tensors_outside_the_interpreter(monkeypatch):
    """Programmatic dependent launch: the MAE kernels ask for it on CUDA tensors of compute
    capability >= 9 only, never under the Triton interpreter or with kernels.pdl.ENABLED off; the
    launch keywords then carry the kernel's PDL constexpr and Triton's launch_pdl."""
    import types

    pdl = sys.modules.get("kernels.pdl") or __import__("kernels.pdl", fromlist=["pdl"])
    cuda_t = types.SimpleNamespace(is_cuda=True, device="cuda:0")
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert pdl.use_pdl(cuda_t) is (pdl.gdc_wait is not None)
    assert pdl.use_pdl(torch.zeros(1)) is False  # CPU tensor
    cap["value"] = (8, 0)
    assert pdl.use_pdl(cuda_t) is False  # Ampere: no PDL
    cap["value"] = (9, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.use_pdl(cuda_t) is False
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert pdl.use_pdl(cuda_t) is False
    assert pdl.launch_options(True) == {"PDL": True, "launch_pdl": True}
    assert pdl.launch_options(False) == {"PDL": False}


def test_channel_major_loss_reads_the_image_in_vectors():
    """Compiled offline for sm_90 (no GPU): in MAE's order the loss kernel gathers the image with one 2-byte
    load per pixel (24 per thread for 4 patches of 3 x 256 bf16 pixels on 128 threads) beside 16-byte
    vectors for pred; channel-major, the image is read in 16-byte vectors too, in both passes."""
    import json
    import os
    import subprocess
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="0")  # compiled, not interpreted: in a process of its own
    out = subprocess.run([sys.executable, "-m", "bench._ptx", "--json"], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    ops = json.loads(out.stdout.strip().splitlines()[-1])
    for backward in (False, True):
        pqc, cpq = (collections.Counter(ops[f"{'backward' if backward else 'forward'} {k}"]) for k in ("pqc", "cpq"))
        assert pqc["ld.global.b16"] == 24 and pqc["ld.global.v4.b32"] == 3
        assert cpq["ld.global.b16"] == 0 and cpq["ld.global.v4.b32"] == 6
        assert sum(n for op, n in cpq.items() if op.startswith("ld.")) < sum(
            n for op, n in pqc.items() if op.startswith("ld.")) / 3
        if backward:  # dpred stores: 16-byte vectors either way
            assert pqc["st.global.v4.b32"] == cpq["st.global.v4.b32"] == 3


def test_backwards_fill_no_zero_gradient_for_index_outputs():
    """mae_unmask's inverse and mae_loss's sum(mask) are outputs that take no gradient: the backwards must not have
    autograd fill zero tensors for them (a kernel each, every step)."""
    masking = sys.modules["kernels.masking"]
    ids, mask, _ = masking.mae_rank(torch.rand(2, 8), 2)
    vis, mt = torch.randn(2, 2, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    full = kernels.mae_unmask(vis, ids, mt, torch.randn(8, 16), mask=mask, impl="triton")
    assert zero_fills(lambda: torch.autograd.grad(full, (vis, mt), torch.randn_like(full))) == []
    imgs, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 48, requires_grad=True)
    loss = kernels.mae_loss(imgs, pred, torch.rand(2, 4) < 0.5, 4, impl="triton")
    assert zero_fills(lambda: torch.autograd.grad(loss, pred)) == []
