import pytest
import timm
import torch

from engine.config import load_config
from engine.objectives import build_objective
from engine.objectives.mae import MaskedAutoencoder
from engine.models import create_encoder, sincos_pos_embed
from tests.engine_helpers import TINY


def tiny_mae(**over) -> MaskedAutoencoder:
    cfg = load_config(None, TINY + [f"{k}={v}" for k, v in over.items()])
    return build_objective(cfg, torch.device("cpu"))


def test_forward_backward_and_visible_tokens_only():
    torch.manual_seed(0)
    model = tiny_mae()
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = model(model.synthetic_batch(3, "cpu"))
    out["loss"].backward()
    # 16 patches, 75 % masked -> 4 visible + class token reach the encoder blocks.
    assert seen == [torch.Size([3, 5, 192])]
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert not model.encoder.pos_embed.requires_grad  # fixed sin-cos


@pytest.mark.parametrize("layout", ["pqc", "cpq"])
def test_loss_matches_manual_computation(layout):
    torch.manual_seed(1)
    model = tiny_mae(**{"objective.mae.pred_layout": layout})
    imgs = model.synthetic_batch(2, "cpu")
    torch.manual_seed(5)
    loss = model(imgs)["loss"]
    torch.manual_seed(5)
    latent, ids_keep, mask = model.encode(imgs)
    pred = model.decode(latent, ids_keep)
    p = model.patch_size
    b, c, h, w = imgs.shape
    order = (0, 2, 4, 3, 5, 1) if layout == "pqc" else (0, 2, 4, 1, 3, 5)  # MAE's (row, col, channel) / channel-major
    target = imgs.reshape(b, c, h // p, p, w // p, p).permute(*order).reshape(b, -1, p * p * c)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    manual = (per_patch * mask).sum() / mask.sum()
    assert mask.float().mean().item() == pytest.approx(0.75)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_channel_major_pred_layout_is_the_same_model(impl):
    """objective.mae.pred_layout=cpq (the default): the decoder's last layer emits each patch channel by channel.
    With its rows permuted from MAE's order (pqc), the model gives the same loss on the same images and masking,
    and the same gradients (the head's permuted the same way)."""
    import kernels

    torch.manual_seed(2)
    a = tiny_mae(**{"objective.mae.pred_layout": "pqc"})
    b = tiny_mae()
    assert a.pred_layout == "pqc" and b.pred_layout == "cpq"
    b.load_state_dict(a.state_dict())
    p = a.patch_size
    perm = kernels.patchify(torch.arange(3 * p * p, dtype=torch.float64).reshape(3, p, p)[None], p)[0, 0].long()
    with torch.no_grad():  # row k of a's head (pixel order) becomes row perm[k] of b's
        b.decoder_pred.weight[perm] = a.decoder_pred.weight
        b.decoder_pred.bias[perm] = a.decoder_pred.bias
    a.impl = b.impl = impl
    imgs = a.synthetic_batch(2, "cpu")
    torch.manual_seed(7)
    la = a(imgs)["loss"]
    torch.manual_seed(7)
    lb = b(imgs)["loss"]
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    la.backward()
    lb.backward()
    torch.testing.assert_close(b.decoder_pred.weight.grad[perm], a.decoder_pred.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.encoder.blocks[0].attn.qkv.weight.grad, a.encoder.blocks[0].attn.qkv.weight.grad,
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(Exception, match="pqc"):
        tiny_mae(**{"objective.mae.pred_layout": "hwc"})


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224"])
def test_encoder_state_dict_loads_into_timm(tmp_path, name):
    from engine.checkpoint import save_encoder

    enc = create_encoder(name, img_size=64, patch_size=16)
    path = tmp_path / "encoder.safetensors"
    save_encoder(enc, path)
    # Strictly into the matching timm model...
    ref = timm.create_model(name, pretrained=True, num_classes=0, img_size=64,
                            pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in enc.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v), k
    # ...and into a classifier, whose fresh head is the only new part.
    clf = timm.create_model(name, pretrained=True, num_classes=7, img_size=64,
                            pretrained_cfg_overlay=dict(file=str(path), num_classes=0))
    assert torch.equal(clf.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)
    assert clf.head.out_features == 7


def test_sincos_pos_embed_properties():
    pe = sincos_pos_embed(64, 4, prefix_tokens=1)
    assert pe.shape == (1, 17, 64)
    assert torch.all(pe[0, 0] == 0)
    # Distinct positions get distinct codes; row/column halves vary independently.
    codes = pe[0, 1:]
    assert torch.cdist(codes, codes).fill_diagonal_(1).min() > 0
    assert torch.equal(codes[0, :32], codes[4, :32])  # same column, different row: column half equal


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_loss_reads_pred_in_the_autocast_dtype(impl, monkeypatch):
    """Under bf16 autocast the decoder's bf16 output goes to the loss as it is (no fp32 copy first), and the loss
    and the decoder head's gradient match those of the same model given an fp32 copy of pred."""
    import kernels

    torch.manual_seed(3)
    model = tiny_mae()
    model.impl = impl  # masking and loss (attention stays SDPA: the interpreter's bf16 tl.dot is wrong)
    imgs = model.synthetic_batch(2, "cpu")
    seen = []
    real = kernels.mae_loss

    def spy(imgs_, pred, *args, **kwargs):
        seen.append(pred.dtype)
        return real(imgs_, pred, *args, **kwargs)

    def run(loss_fn):
        monkeypatch.setattr(kernels, "mae_loss", loss_fn)
        model.zero_grad()
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(imgs)["loss"]
        loss.backward()
        return loss.detach(), model.decoder_pred.weight.grad.clone()

    loss, grad = run(spy)
    assert seen == [torch.bfloat16]
    ref_loss, ref_grad = run(lambda imgs_, pred, *a, **k: real(imgs_, pred.float(), *a, **k))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    # the interpreter rounds the kernel's fp32 -> bf16 dpred store toward zero (the GPU to nearest, as torch's cast
    # does), so the triton path's dpred may differ from the cast copy's by one bf16 ulp (2^-8 relative)
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() < (1e-2 if impl == "triton" else 1e-6)
