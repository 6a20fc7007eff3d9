"""engine.attention.KernelAttention as timm's attn_layer: same function and state dict as timm's Attention."""
import pytest
import torch

from tests.kernel_helpers import interpreted_kernels

kernels = interpreted_kernels()
timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from engine.attention import KernelAttention, kernel_attention  # noqa: E402


def _pair(make):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    ref = make(None)
    ours = make(KernelAttention)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_vit_tiny_same_output(impl):
    def make(layer):
        kw = {} if layer is None else {"attn_layer": kernel_attention(impl)}
        return timm.create_model("vit_tiny_patch16_224", **kw)

    ref, ours = _pair(make)
    assert list(ref.state_dict()) == list(ours.state_dict())
    assert all(type(b.attn).__name__ == f"KernelAttention_{impl}" for b in ours.blocks)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_triton_path_tiny_vit_forward_backward():
    def make(layer):
        kw = {} if layer is None else {"attn_layer": kernel_attention("triton")}
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5, **kw)

    ref, ours = _pair(make)
    x = torch.randn(2, 3, 32, 32)
    a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_qk_norm_and_fallbacks():
    layer = KernelAttention(64, num_heads=4, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    layer.impl = "triton"
    base = timm.layers.Attention(64, num_heads=4, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    base.load_state_dict(layer.state_dict())
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-4, atol=1e-5)
    # an attention mask is outside the kernel: timm's own path answers
    mask = torch.zeros(2, 1, 9, 9)
    mask[..., -2:] = float("-inf")
    torch.testing.assert_close(layer(x, attn_mask=mask), base(x, attn_mask=mask))
    with pytest.raises(ValueError):
        kernel_attention("nope")
