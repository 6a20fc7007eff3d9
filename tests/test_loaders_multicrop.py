"""loaders.multicrop: crop shapes and counts, reproducible parameters, and the batched
photometric ops against torchvision's single-image functions."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from loaders.backends.cpu import collate, sample_generator
from loaders.multicrop import NUM_PARAMS, PARAMS, MultiCropSpec, adjust_hue, gaussian_blur, photometric

SPEC = MultiCropSpec(global_size=32, local_size=16, global_crops=2, local_crops=3)


def image(c=3, h=40, w=56, seed=0):
    return torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_views_shapes_counts_and_finish_layout():
    rows = []
    for i in range(4):
        views = SPEC.views(image(c=1 if i == 3 else 3, seed=i), sample_generator(0, 0, i))
        assert len(views) == SPEC.global_crops + SPEC.local_crops + 1
        assert all(v.shape == (3, 32, 32) and v.dtype == torch.uint8 for v in views[:2])
        assert all(v.shape == (3, 16, 16) and v.dtype == torch.uint8 for v in views[2:5])
        assert views[-1].shape == (SPEC.num_crops, NUM_PARAMS)
        rows.append({"views": views, "modality": "CT", "source": "s", "uid": str(i)})
    batch = collate(rows)
    g, loc = SPEC.finish(batch["views"], torch.float32)
    assert g.shape == (2 * 4, 3, 32, 32) and loc.shape == (3 * 4, 3, 16, 16)
    # crop-major: rows 0..3 are crop 0 of images 0..3, rows 4..7 crop 1
    p = batch["views"][-1]
    ref = photometric(batch["views"][1], p[:, 1])
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)
    torch.testing.assert_close(g[4:8], (ref - mean) / std)
    ref = photometric(batch["views"][4], p[:, 4])
    torch.testing.assert_close(loc[8:12], (ref - mean) / std)
    no_locals = MultiCropSpec(global_size=32, local_size=16, local_crops=0)
    views = no_locals.views(image(), sample_generator(0, 0, 0))
    g, loc = no_locals.finish([v.unsqueeze(0) for v in views], torch.bfloat16)
    assert g.shape == (2, 3, 32, 32) and g.dtype == torch.bfloat16 and loc.shape == (0, 3, 16, 16)


def test_views_are_a_function_of_the_sample_generator():
    a = SPEC.views(image(), sample_generator(3, 1, 17))
    b = SPEC.views(image(), sample_generator(3, 1, 17))
    c = SPEC.views(image(), sample_generator(3, 1, 18))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_param_statistics_follow_the_probabilities():
    spec = MultiCropSpec(global_crops=2, local_crops=8)
    p = torch.stack([spec.draw_params(sample_generator(0, 0, i)) for i in range(600)])  # [n, crops, P]
    col = {n: p[..., i] for i, n in enumerate(PARAMS)}
    assert col["blur"][:, 0].eq(1).all()  # first global crop: always blurred
    assert abs(col["blur"][:, 1].mean().item() - 0.1) < 0.05
    assert abs(col["blur"][:, 2:].mean().item() - 0.5) < 0.05
    assert col["solarize"][:, 0].eq(0).all() and col["solarize"][:, 2:].eq(0).all()
    assert abs(col["solarize"][:, 1].mean().item() - 0.2) < 0.05
    assert abs(col["jitter"].mean().item() - 0.8) < 0.03 and abs(col["gray"].mean().item() - 0.2) < 0.03
    assert col["brightness"].min() >= 0.6 and col["brightness"].max() <= 1.4
    assert col["hue"].abs().max() <= 0.1
    orders = p[..., 5:9].sort(dim=-1).values
    assert torch.equal(orders, torch.arange(4.0).expand_as(orders))  # each order is a permutation


def _params(n, **values):
    p = torch.zeros(n, NUM_PARAMS)
    p[:, PARAMS.index("brightness")] = 1
    p[:, PARAMS.index("contrast")] = 1
    p[:, PARAMS.index("saturation")] = 1
    p[:, PARAMS.index("sigma")] = 1
    p[:, 5:9] = torch.arange(4.0)
    for k, v in values.items():
        p[:, PARAMS.index(k)] = torch.as_tensor(v, dtype=torch.float32)
    return p


def test_photometric_ops_match_torchvision():
    imgs = torch.stack([image(h=24, w=24, seed=s) for s in range(3)])
    x = imgs.float() / 255
    assert torch.equal(photometric(imgs, _params(3)), x)  # nothing drawn: identity

    f = torch.tensor([0.7, 1.0, 1.3])
    for name, fn in (("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
                     ("saturation", TF.adjust_saturation)):
        out = photometric(imgs, _params(3, jitter=1, **{name: f}))
        ref = torch.stack([fn(x[i], f[i].item()) for i in range(3)])
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)

    h = torch.tensor([-0.1, 0.05, 0.25])
    out = adjust_hue(x, h)
    ref = torch.stack([TF.adjust_hue(x[i], h[i].item()) for i in range(3)])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)

    out = photometric(imgs, _params(3, gray=[1, 0, 0]))
    torch.testing.assert_close(out[0], TF.rgb_to_grayscale(x[0], num_output_channels=3), atol=1e-6, rtol=0)
    assert torch.equal(out[1:], x[1:])

    out = photometric(imgs, _params(3, solarize=[0, 1, 0]))
    assert torch.equal(out[1], torch.where(x[1] >= 128 / 255, 1 - x[1], x[1]))
    assert torch.equal(out[[0, 2]], x[[0, 2]])


def test_jitter_order_is_per_image():
    imgs = image(h=16, w=16).unsqueeze(0).repeat(2, 1, 1, 1)
    x = imgs.float()[:1] / 255
    p = _params(2, jitter=1, brightness=1.4, hue=0.2)
    p[1, 5:9] = torch.tensor([3.0, 0, 1, 2])  # hue first, then brightness
    out = photometric(imgs, p)
    torch.testing.assert_close(out[0:1], adjust_hue(TF.adjust_brightness(x, 1.4), torch.tensor([0.2])))
    torch.testing.assert_close(out[1:2], TF.adjust_brightness(adjust_hue(x, torch.tensor([0.2])), 1.4))
    assert not torch.allclose(out[0], out[1])


def test_gaussian_blur_per_image_sigma():
    x = torch.zeros(2, 3, 21, 21)
    x[:, :, 10, 10] = 1.0
    out = gaussian_blur(x, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(out.sum(dim=(2, 3)), torch.ones(2, 3))  # mass kept
    assert out[0, 0, 10, 10] > out[1, 0, 10, 10] > 0  # the wider sigma spreads more
    ref = TF.gaussian_blur(x[1], kernel_size=[13, 13], sigma=[2.0, 2.0])
    torch.testing.assert_close(out[1], ref, atol=1e-6, rtol=1e-4)


def test_spec_validation():
    with pytest.raises(ValueError):
        MultiCropSpec(global_crops=0)
    with pytest.raises(ValueError):
        MultiCropSpec(local_scale=(0.5, 0.2))
    with pytest.raises(ValueError):
        MultiCropSpec(blur=(1.0, 0.1))
