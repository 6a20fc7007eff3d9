"""kernels.gelu_mlp (a ViT block's MLP with its GELU and fc1's bias gradient in our kernels) under TRITON_INTERPRET=1
against timm's Mlp in torch; engine.models.FusedMlp / fuse_mlps and model.fused_mlp in both objectives."""
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from tests.engine_helpers import DINOV2_TINY, TINY
from tests.kernel_helpers import interpreted_kernels, zero_fills

kernels = interpreted_kernels()
from kernels import mlp  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _params(C, F, g, dtype=torch.float32):
    return [(torch.randn(*s, generator=g) * sc).to(dtype).requires_grad_()
            for s, sc in (((F, C), C ** -0.5), ((F,), 1.0), ((C, F), F ** -0.5), ((C,), 1.0))]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles and chunks far smaller than the GPU's, so that a test's few rows still make several row tiles, column
    tiles and chunks, with ragged edges."""
    for k, v in {"bm": 4, "bn": 16, "min_chunk_rows": 8, "max_chunks": 5}.items():
        monkeypatch.setitem(mlp.LAUNCH, k, v)


@pytest.mark.parametrize("shape,C,F", [((1,), 8, 24), ((37,), 16, 40), ((3, 33), 12, 64), ((0,), 8, 16),
                                       ((2, 5), 4, 7)])
def test_gelu_mlp_matches_timms_mlp(small_tiles, shape, C, F):
    """Values and every gradient (x, both weights, both biases) against fc2(gelu(fc1(x))) in fp32; leading dims kept;
    no rows at all."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(*shape, C, generator=g).requires_grad_()
    ins = [x, *_params(C, F, g)]
    got = kernels.gelu_mlp(*ins, impl="triton")
    want = kernels.gelu_mlp_reference(*ins)
    assert got.shape == want.shape == (*shape, C) and got.dtype == torch.float32
    if not x.numel():
        return
    assert rel(got, want) < 1e-5
    dout = torch.randn(got.shape, generator=g)
    for name, a, b in zip(("x", "w1", "b1", "w2", "b2"), torch.autograd.grad(got, ins, dout),
                          torch.autograd.grad(want, ins, dout)):
        assert a.dtype == b.dtype and rel(a, b) < 1e-5, name


def test_gelu_mlp_16_bit_and_fp32_biases(small_tiles):
    """fp16 input and weights with fp32 biases (the interpreter's bf16 is not exact; autocast keeps the fp32 bias
    parameters): output in fp16, bias gradients in fp32, near the fp32 result."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(45, 16, generator=g).requires_grad_()
    w1, b1, w2, b2 = _params(16, 48, g)
    half = [t.detach().half().requires_grad_() for t in (x, w1, w2)]
    got = kernels.gelu_mlp(half[0], half[1], b1, half[2], b2, impl="triton")
    want = kernels.gelu_mlp_reference(x, w1, b1, w2, b2)
    assert got.dtype == torch.float16 and rel(got.float(), want) < 5e-3
    dout = torch.randn(got.shape, generator=g)
    d = torch.autograd.grad(got, [half[0], half[1], b1, half[2], b2], dout.half())
    dw = torch.autograd.grad(want, [x, w1, b1, w2, b2], dout)
    assert [t.dtype for t in d] == [torch.float16, torch.float16, torch.float32, torch.float16, torch.float32]
    for a, b in zip(d, dw):
        assert rel(a.float(), b) < 1e-2


def test_bias_gradient_is_the_same_bits_run_to_run(small_tiles):
    """fc1's bias gradient from per-chunk partial sums added by torch: no atomics, so the same bits every run."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(101, 8, generator=g)
    w1, b1, w2, b2 = _params(8, 40, g)
    runs = [torch.autograd.grad(kernels.gelu_mlp(x, w1, b1, w2, b2, impl="triton").sum(), b1)[0] for _ in range(2)]
    assert torch.equal(*runs)


def test_chunks_cover_the_rows_with_whole_tiles(monkeypatch):
    monkeypatch.setitem(mlp.LAUNCH, "bm", 16)
    monkeypatch.setitem(mlp.LAUNCH, "bn", 512)
    for M in (1, 255, 256, 4097, 244224):
        chunks, rows = mlp._chunks(M, 1536)
        assert rows % 16 == 0 and (chunks - 1) * rows < M <= chunks * rows
        assert chunks <= mlp.LAUNCH["max_chunks"]
    assert mlp._chunks(244224, 1536)[0] >= mlp.LAUNCH["max_chunks"] - 1  # a big batch fills the chunks (whole tiles)


def test_refuses_mismatched_shapes_and_dtypes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, generator=g)
    w1, b1, w2, b2 = (t.detach() for t in _params(8, 16, g))
    with pytest.raises(ValueError, match=r"w1 \[F, 8\]"):
        kernels.gelu_mlp(x, w1.t(), b1, w2, b2, impl="triton")
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.gelu_mlp(x.half(), w1, b1, w2, b2, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        kernels.gelu_mlp(x, w1, b1, w2, b2, impl="cuda")


def test_custom_ops_pass_opcheck(small_tiles):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(21, 8, generator=g, requires_grad=True)
    w1, b1, w2, b2 = _params(8, 24, g)
    result = torch.library.opcheck(mlp._mlp_op, (x, w1, b1, w2, b2))
    assert all(v == "SUCCESS" for v in result.values()), result
    y = (x.detach() @ w1.detach().t())
    result = torch.library.opcheck(mlp._mlp_bwd_op, (torch.randn(21, 8, generator=g), x.detach(), w1.detach(),
                                                     b1.detach(), w2.detach(), y))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_no_zero_fill_for_the_kept_product(small_tiles):
    """y (kept for the backward) takes no gradient: autograd must not fill a zero [tokens, hidden] tensor for it."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 8, generator=g, requires_grad=True)
    ins = [x, *_params(8, 24, g)]
    out = kernels.gelu_mlp(*ins, impl="triton")
    assert zero_fills(lambda: out.sum().backward()) == []


# ---------------------------------------------------------------- engine.models.FusedMlp


def test_fuse_mlps_swaps_only_what_it_can_run():
    from timm.layers import Mlp, SwiGLU

    from engine.models import FusedMlp, fuse_mlps

    m = nn.ModuleList([Mlp(8, 32), Mlp(8, 32, act_layer=lambda: nn.GELU(approximate="tanh")), Mlp(8, 32, drop=0.1),
                       SwiGLU(8, 32), Mlp(8, 32, bias=False), Mlp(8, 32, act_layer=nn.ReLU)])
    assert fuse_mlps(m) == 1
    assert [type(c) for c in m] == [FusedMlp, Mlp, Mlp, SwiGLU, Mlp, Mlp]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_encoder_keeps_timms_state_dict_and_outputs(small_tiles, name):
    """Every block's MLP swapped; timm's state dict loads strictly; outputs and parameter gradients match; `fused`
    off runs timm's forward."""
    from engine.models import FusedMlp, create_encoder, fuse_mlps

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    enc = create_encoder(name, **kw)
    ref = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    ref.load_state_dict(enc.state_dict())
    assert fuse_mlps(enc, impl="triton") == 2
    ref.load_state_dict(enc.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 3, 32, 32)
    got, want = enc(x), ref(x)
    assert rel(got, want) < 1e-5
    (gw,), (rw,) = (torch.autograd.grad(o.square().sum(), m.blocks[0].mlp.fc1.bias) for o, m in ((got, enc),
                                                                                                  (want, ref)))
    assert rel(gw, rw) < 2e-4  # through two blocks and a squared output, in fp32
    for blk in enc.blocks:
        assert type(blk.mlp) is FusedMlp
        blk.mlp.fused = False
    assert torch.equal(enc(x), ref(x))


def test_meta_tensors_count_the_products():
    """engine.plan counts FLOPs on meta tensors: FusedMlp runs timm's forward there, with the same count."""
    from timm.layers import Mlp
    from torch.utils.flop_counter import FlopCounterMode

    from engine.models import fuse_mlps

    with torch.device("meta"):
        m = Mlp(16, 64)
        x = torch.empty(10, 16)
    with FlopCounterMode(display=False) as before:
        m(x)
    fuse_mlps(m)
    with FlopCounterMode(display=False) as after:
        m(x)
    assert after.get_total_flops() == before.get_total_flops() == 2 * 2 * 10 * 16 * 64


def test_autocast_and_compile(small_tiles):
    """Under autocast (fp16 on CPU here) the input and weights are cast as F.linear's autocast would; the op compiles
    inside a fullgraph torch.compile (the whole-model MAE step), with the same result as eager."""
    from timm.layers import Mlp

    from engine.models import fuse_mlps

    torch.manual_seed(0)
    ref = Mlp(16, 48)
    m = Mlp(16, 48)
    m.load_state_dict(ref.state_dict())
    fuse_mlps(m, impl="triton")
    x = torch.randn(3, 7, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        got, want = m(x), ref(x)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert got.dtype == want.dtype == torch.float16
    assert rel(got.float(), want.float()) < 5e-3 and torch.equal(compiled, got)
    got.float().sum().backward()
    assert m.fc1.weight.grad.dtype == torch.float32 and m.fc1.bias.grad.dtype == torch.float32


@pytest.mark.parametrize("recipe,extra", [("quickstart.yaml", TINY), ("quickstart_dinov2.yaml", DINOV2_TINY)])
def test_objectives_take_the_setting(small_tiles, recipe, extra):
    """model.fused_mlp with our kernels: every encoder (and MAE decoder) MLP swapped, the same loss as timm's; with
    model.kernels=torch it changes nothing (the baseline keeps timm's MLP)."""
    from engine.config import load_config
    from engine.models import FusedMlp
    from engine.objectives import build_objective

    losses, counts = {}, {}
    for setting in (["model.kernels=triton", "model.fused_mlp=true"], ["model.kernels=triton", "model.fused_mlp=false"],
                    ["model.kernels=torch", "model.fused_mlp=true"]):
        cfg = load_config(RECIPES / recipe, list(extra) + setting)
        torch.manual_seed(0)
        model = build_objective(cfg, torch.device("cpu"))
        counts[tuple(setting)] = sum(isinstance(m, FusedMlp) for m in model.modules())
        batch = model.synthetic_batch(2, "cpu")
        torch.manual_seed(1)
        losses[tuple(setting)] = model(batch)["loss"]
    on, off, torch_ = counts.values()
    dinov2 = "dinov2" in recipe
    blocks = 2 * 2 if dinov2 else len(model.encoder.blocks) + len(model.decoder_blocks)
    assert (on, off, torch_) == (blocks, 0, 0)
    vals = list(losses.values())
    torch.testing.assert_close(vals[0], vals[1], rtol=1e-4, atol=1e-5)
