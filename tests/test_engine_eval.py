"""MedMNIST evaluation: metrics against hand-made cases, data files, probes, cache, CLI."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.evaluation import medmnist
from engine.evaluation.metrics import task_metrics, weighted_auc
from engine.evaluation.probe import ProbeConfig, knn_predict, train_linear_probe

IMG = 32  # vit_tiny at 32 px: 4 patches, cheap on CPU


# ----------------------------------------------------------------------------- synthetic files


def _easy(rng, n, classes, rgb, size=28, noise=30.0):
    """Images whose mean intensity encodes the class: separable, but not trivially so per pixel."""
    y = rng.integers(0, classes, n)
    base = (y * (180 // classes) + 30).astype(np.float32)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    img = base.reshape(-1, *([1] * (len(shape) - 1))) + rng.normal(0, noise, shape)
    return np.clip(img, 0, 255).astype(np.uint8), y


def write_easy(path: Path, sizes=(150, 40, 60), classes=9, rgb=True, seed=0, size=28):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(medmnist.SPLITS, sizes):
        x, y = _easy(rng, n, classes, rgb, size)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)


def write_chest(path: Path, sizes=(150, 40, 60), seed=1):
    """14 binary labels: label 0 follows the intensity, the rest are coin flips."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(medmnist.SPLITS, sizes):
        x, y = _easy(rng, n, 4, False)
        lab = rng.integers(0, 2, (n, 14))
        lab[:, 0] = y >= 2
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, lab.astype(np.uint8)
    np.savez(path, **arrays)


def write_single_class(path: Path, seed=2):
    """breastmnist-like and tiny: val and test hold only class 0."""
    rng = np.random.default_rng(seed)
    x, y = _easy(rng, 40, 2, False)
    xv, _ = _easy(rng, 8, 2, False)
    xt, _ = _easy(rng, 10, 2, False)
    np.savez(
        path,
        train_images=x, train_labels=y.reshape(-1, 1).astype(np.uint8),
        val_images=xv, val_labels=np.zeros((8, 1), np.uint8),
        test_images=xt, test_labels=np.zeros((10, 1), np.uint8),
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("medmnist")
    write_easy(d / "pathmnist.npz")
    write_chest(d / "chestmnist.npz")
    write_single_class(d / "breastmnist.npz")
    return d


@pytest.fixture(scope="module")
def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=IMG)


def make_run_dir(root: Path, model, step=10, objective="mae", img_size=IMG, patch_size=None) -> Path:
    from safetensors.torch import save_file

    run = root / f"run_{objective}"
    ck = run / "checkpoints" / f"step_{step:08d}"
    ck.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck / "encoder.safetensors"))
    (run / "checkpoints" / "LATEST").write_text(f"step_{step:08d}\n")
    (run / "config.yaml").write_text(
        f"model:\n  name: vit_tiny_patch16_224\n  img_size: {img_size}\n"
        + (f"  patch_size: {patch_size}\n" if patch_size else "")
        + f"objective:\n  name: {objective}\ndata:\n  augment:\n    scale: [0.2, 1.0]\n    mean: [0.5, 0.5, 0.5]\n"
          "    std: [0.25, 0.25, 0.25]\n"
    )
    (run / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps({"step": s, "epoch": s // 5, "loss": 1.0 / s, "lr": 1e-3, "img_per_s": 100.0 + s, "time": s})
            for s in range(1, 11)
        )
        + "\n"
    )
    return run


# ----------------------------------------------------------------------------- metrics


def brute_auc(scores, pos):
    p = [s for s, q in zip(scores, pos) if q]
    n = [s for s, q in zip(scores, pos) if not q]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in p for b in n) / (len(p) * len(n))


def test_auc_hand_made_cases():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    assert weighted_auc(s, torch.tensor([False, False, True, True])).item() == pytest.approx(0.75)
    # ties count one half: pos {0.5, 0.9} vs neg {0.5, 0.2} -> (0.5 + 1 + 1 + 1) / 4
    s = torch.tensor([0.5, 0.5, 0.2, 0.9])
    assert weighted_auc(s, torch.tensor([True, False, False, True])).item() == pytest.approx(0.875)
    # perfectly wrong ordering
    assert weighted_auc(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([False, False, True])).item() == 0.0


def test_auc_matches_pairwise_count_with_ties_and_weights():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (57,), generator=g).double() / 5  # many ties
    pos = torch.rand(57, generator=g) > 0.6
    assert weighted_auc(scores, pos).item() == pytest.approx(brute_auc(scores.tolist(), pos.tolist()))
    # a weight vector of draw counts equals the AUC of the resampled arrays
    idx = torch.randint(0, 57, (57,), generator=g)
    w = torch.bincount(idx, minlength=57).double()[None]
    expected = brute_auc(scores[idx].tolist(), pos[idx].tolist())
    assert weighted_auc(scores, pos, w)[0].item() == pytest.approx(expected)


def test_multiclass_macro_auc_and_accuracy():
    scores = torch.tensor(
        [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6]]
    )
    labels = torch.tensor([0, 1, 2, 2, 0, 1])
    per_class = [brute_auc(scores[:, c].tolist(), (labels == c).tolist()) for c in range(3)]
    m = task_metrics(scores, labels, multilabel=False)
    assert m["auc"] == pytest.approx(sum(per_class) / 3)
    # argmax: 0, 1, 2, 1, 0, 2 -> right on samples 0, 1, 2, 4
    assert m["acc"] == pytest.approx(4 / 6)


def test_multilabel_auc_is_mean_over_labels_and_acc_thresholds_at_half():
    scores = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.4, 0.4], [0.1, 0.8]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    m = task_metrics(scores, labels, multilabel=True)
    a0 = brute_auc([0.9, 0.6, 0.4, 0.1], [1, 0, 1, 0])  # 0.75
    a1 = brute_auc([0.2, 0.7, 0.4, 0.8], [0, 1, 0, 1])  # 1.0
    assert m["auc"] == pytest.approx((a0 + a1) / 2)
    # label 0 right on samples 0, 3; label 1 right on all four -> 6 / 8
    assert m["acc"] == pytest.approx(6 / 8)


def test_single_class_split_gives_nan_and_warning():
    scores = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 0])
    with pytest.warns(UserWarning, match="only one class"):
        m = task_metrics(scores, labels, multilabel=False, bootstrap=20)
    assert math.isnan(m["auc"]) and m["acc"] == pytest.approx(2 / 3)
    assert all(math.isnan(v) for v in m["auc_ci"])


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_n():
    g = torch.Generator().manual_seed(1)

    def make(n):
        y = torch.randint(0, 2, (n,), generator=g)
        s = torch.stack([1 - (y + torch.randn(n, generator=g)).sigmoid(), (y + torch.randn(n, generator=g)).sigmoid()],
                        1)
        return s, y

    s, y = make(200)
    m = task_metrics(s, y, multilabel=False, bootstrap=300)
    lo, hi = m["auc_ci"]
    assert lo < m["auc"] < hi and lo > 0.5
    s2, y2 = make(3000)
    m2 = task_metrics(s2, y2, multilabel=False, bootstrap=300)
    assert (m2["auc_ci"][1] - m2["auc_ci"][0]) < (hi - lo)
    assert m2["acc_ci"][0] < m2["acc"] < m2["acc_ci"][1]


# ----------------------------------------------------------------------------- data files


def test_load_task_reads_official_layout(data_dir):
    chest = medmnist.load_task(data_dir, "chestmnist")
    assert chest.info.multilabel and chest.labels["train"].shape == (150, 14)
    path = medmnist.load_task(data_dir, "pathmnist")
    assert path.labels["test"].shape == (60,) and path.images["train"].shape == (150, 28, 28, 3)
    assert path.size == 28
    labels_only = medmnist.load_task(data_dir, "pathmnist", with_images=False)
    assert labels_only.images == {} and (labels_only.labels["val"] == path.labels["val"]).all()


def test_malformed_file_names_the_missing_arrays(tmp_path):
    np.savez(tmp_path / "octmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(KeyError, match="val_images"):
        medmnist.load_task(tmp_path, "octmnist")


def test_size_auto_prefers_largest_and_explicit_size(tmp_path):
    write_easy(tmp_path / "dermamnist.npz", sizes=(20, 5, 5), classes=7)
    write_easy(tmp_path / "dermamnist_64.npz", sizes=(20, 5, 5), classes=7, size=64)
    assert medmnist.find_task_file(tmp_path, "dermamnist")[1] == 64
    assert medmnist.find_task_file(tmp_path, "dermamnist", 28)[0].name == "dermamnist.npz"
    with pytest.raises(medmnist.MissingDataError, match="dermamnist_128.npz"):
        medmnist.find_task_file(tmp_path, "dermamnist", 128)


def test_missing_files_are_named(data_dir, tmp_path, capsys):
    with pytest.raises(medmnist.MissingDataError) as err:
        medmnist.check_available(data_dir, ["pathmnist", "octmnist", "tissuemnist"])
    msg = str(err.value)
    assert ("octmnist.npz" in msg and "tissuemnist.npz" in msg
            and "pathmnist" not in msg.split("missing")[1].split(":")[0])
    from engine.eval import main

    import timm
    from safetensors.torch import save_file

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=IMG)
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    rc = main([str(tmp_path / "w.safetensors"), "--model", "vit_tiny_patch16_224", "--img-size", str(IMG),
               "--data", str(data_dir), "--tasks", "pathmnist", "dermamnist", "--no-progress"])
    assert rc == 2
    assert "dermamnist.npz" in capsys.readouterr().err


# ----------------------------------------------------------------------------- probes


def test_linear_probe_beats_chance_on_easy_task(data_dir, tiny_vit):
    from engine.eval import evaluate_encoder

    res = evaluate_encoder(tiny_vit, data_dir, ["pathmnist"], img_size=IMG, method="both")
    assert res["pathmnist"]["auc"] > 0.9  # chance is 0.5
    assert res["pathmnist"]["acc"] > 0.5  # chance is 1/9
    assert res["pathmnist"]["knn_auc"] > 0.9


def test_chestmnist_is_multilabel(data_dir, tiny_vit, monkeypatch):
    import engine.evaluation.probe as probe
    from engine.eval import evaluate_encoder

    seen = {}
    real = probe.train_linear_probe

    def spy(*args, **kw):
        seen.update(kw)
        head, info = real(*args, **kw)
        seen["outputs"] = head[1].out_features
        return head, info

    monkeypatch.setattr("engine.eval.train_linear_probe", spy)
    res = evaluate_encoder(tiny_vit, data_dir, ["chestmnist"], img_size=IMG)
    assert seen["multilabel"] and seen["outputs"] == 14
    # label 0 is learnable, the 13 others are noise: mean AUC ≈ (1 + 13 · 0.5) / 14
    assert 0.5 < res["chestmnist"]["auc"] < 0.7


def test_probe_on_single_class_splits_stops_on_val_loss(data_dir, tiny_vit):
    from engine.eval import evaluate_encoder

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate_encoder(tiny_vit, data_dir, ["breastmnist"], img_size=IMG)
    assert math.isnan(res["breastmnist"]["auc"])
    assert 0.0 <= res["breastmnist"]["acc"] <= 1.0
    assert any("only one class" in str(w.message) for w in caught)


def test_linear_probe_and_knn_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3

    def make(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return centers[y] + torch.randn(n, 16, generator=g), y

    (xtr, ytr), (xv, yv), (xt, yt) = make(300), make(60), make(90)
    head, info = train_linear_probe(xtr, ytr, xv, yv, num_classes=3, multilabel=False,
                                    cfg=ProbeConfig(epochs=30, batch_size=64))
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine
    assert info["val_auc"] > 0.95 and 1 <= info["best_epoch"] <= info["epochs_run"] <= 30
    scores = knn_predict(xtr, ytr, xt, num_classes=3, multilabel=False, k=20)
    assert torch.allclose(scores.sum(1), torch.ones(90), atol=1e-5)
    assert task_metrics(scores, yt, False)["acc"] > 0.9


def test_evaluate_encoder_leaves_encoder_and_rng_alone(data_dir, tiny_vit):
    from engine.eval import evaluate_encoder

    tiny_vit.train()
    tiny_vit.blocks[0].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    rng = torch.random.get_rng_state()
    evaluate_encoder(tiny_vit, data_dir, ["pathmnist"], img_size=IMG, max_train=100)
    assert tiny_vit.training and not tiny_vit.blocks[0].training and tiny_vit.blocks[1].training
    assert all(torch.equal(before[k], v) for k, v in tiny_vit.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())
    tiny_vit.eval()


# ----------------------------------------------------------------------------- cache and CLI


class ForwardCounter:
    def __init__(self, monkeypatch):
        from timm.models.vision_transformer import VisionTransformer

        self.calls = 0
        real = VisionTransformer.forward_features

        def counted(model, x, *a, **kw):
            self.calls += 1
            return real(model, x, *a, **kw)

        monkeypatch.setattr(VisionTransformer, "forward_features", counted)


def test_cli_end_to_end_on_run_dir_with_cache(data_dir, tmp_path, monkeypatch):
    import timm

    from engine.eval import main

    # the recipe's model section: 16 px with 8-px patches (as the quickstart recipe does at 64/8)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=8)
    run = make_run_dir(tmp_path, model, img_size=16, patch_size=8)
    counter = ForwardCounter(monkeypatch)
    argv = [str(run), "--data", str(data_dir), "--tasks", "pathmnist", "chestmnist", "--method", "both",
            "--bootstrap", "50", "--epochs", "15", "--batch-size", "64", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    first = counter.calls
    assert first > 0
    rec = json.loads((run / "eval" / "linear_step_00000010.json").read_text())
    assert rec["model"] == "vit_tiny_patch16_224" and rec["objective"] == "mae" and rec["img_size"] == 16
    assert rec["params"] == sum(p.numel() for p in model.parameters())
    assert rec["mean"] == [0.5, 0.5, 0.5] and rec["std"] == [0.25, 0.25, 0.25]  # the recipe's normalization
    assert set(rec["tasks"]) == {"pathmnist", "chestmnist"}
    p = rec["tasks"]["pathmnist"]
    assert p["auc"] > 0.9 and p["auc_ci"][0] <= p["auc"] <= p["auc_ci"][1] and not p["cached"]
    assert (run / "eval" / "knn_step_00000010.json").is_file()
    assert "| pathmnist |" in (run / "eval" / "linear_step_00000010.md").read_text()
    assert list((run / "eval" / "cache").rglob("*.npy"))

    # second run: every feature comes from the cache, the model never runs, no image is read
    import engine.eval as ev

    reads = []
    real_load = ev.load_images
    monkeypatch.setattr(ev, "load_images", lambda *a, **k: reads.append(a) or real_load(*a, **k))
    assert main(argv) == 0
    assert counter.calls == first and reads == []
    rec2 = json.loads((run / "eval" / "linear_step_00000010.json").read_text())
    assert rec2["tasks"]["pathmnist"]["cached"]
    assert rec2["tasks"]["pathmnist"]["auc"] == pytest.approx(p["auc"])

    # new weights (a new checkpoint file) → new features
    import os
    w = run / "checkpoints" / "step_00000010" / "encoder.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    assert main(argv[:4] + ["pathmnist", *argv[6:]]) == 0
    assert counter.calls > first


def test_api_cache_reuses_features_for_same_weights(data_dir, tiny_vit, tmp_path, monkeypatch):
    from engine.eval import evaluate_encoder

    counter = ForwardCounter(monkeypatch)
    a = evaluate_encoder(tiny_vit, data_dir, ["pathmnist"], img_size=IMG, cache_dir=tmp_path, max_train=60)
    n = counter.calls
    b = evaluate_encoder(tiny_vit, data_dir, ["pathmnist"], img_size=IMG, cache_dir=tmp_path, max_train=60)
    assert n > 0 and counter.calls == n and a == b
    with torch.no_grad():
        tiny_vit.blocks[-1].mlp.fc2.bias.add_(0.5)  # weights changed → features recomputed
    try:
        evaluate_encoder(tiny_vit, data_dir, ["pathmnist"], img_size=IMG, cache_dir=tmp_path, max_train=60)
        assert counter.calls > n
    finally:
        with torch.no_grad():
            tiny_vit.blocks[-1].mlp.fc2.bias.sub_(0.5)


def test_bare_weights_file_needs_model_and_resamples_pos_embed(data_dir, tmp_path):
    import timm
    from safetensors.torch import save_file

    from engine.eval import CheckpointError, load_encoder, resolve_checkpoint

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=48)
    save_file(m.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="--model"):
        resolve_checkpoint(tmp_path / "other.safetensors")
    ck = resolve_checkpoint(tmp_path / "other.safetensors", model="vit_tiny_patch16_224", img_size=IMG)
    enc = load_encoder(ck)  # 3x3 grid stored, 2x2 wanted
    assert enc.pos_embed.shape[1] == 1 + 4
    torch.save({"model": m.state_dict()}, tmp_path / "other.pth")
    enc2 = load_encoder(resolve_checkpoint(tmp_path / "other.pth", model="vit_tiny_patch16_224", img_size=48))
    assert torch.equal(enc2.blocks[0].attn.qkv.weight, m.blocks[0].attn.qkv.weight)


def test_preprocess_resizes_expands_and_normalizes():
    from engine.evaluation.features import preprocess, pool

    gray = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    mean, std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.5, 1.0])
    x = preprocess(gray, 64, mean, std)
    assert x.shape == (2, 3, 64, 64)
    assert torch.allclose(x[:, :, 10, 10], torch.tensor([2.0, 1.0, 0.5]).expand(2, 3))
    rgb = torch.zeros(1, 100, 100, 3, dtype=torch.uint8)
    rgb[..., 0] = 255
    y = preprocess(rgb, 32, mean, std)  # shrinking: antialiased
    assert y.shape == (1, 3, 32, 32) and torch.allclose(y[0, 0], torch.full((32, 32), 2.0))
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    assert torch.equal(pool(tokens, 1), tokens[:, 1:].mean(1))


FSDP_SCRIPT = r"""
import os, sys, torch, timm
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
from engine.eval import evaluate_encoder
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (1,))
torch.manual_seed(0)
m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
ref.load_state_dict(m.state_dict())
for b in m.blocks:
    fully_shard(b, mesh=mesh)
fully_shard(m, mesh=mesh)
m(torch.randn(2, 3, 32, 32)).sum().backward()  # as after a training step
a = evaluate_encoder(m, sys.argv[1], ["pathmnist"], img_size=32, max_train=60)
b = evaluate_encoder(ref, sys.argv[1], ["pathmnist"], img_size=32, max_train=60)
assert type(m.patch_embed.proj.weight).__name__ == "DTensor"  # resharded afterwards
m(torch.randn(2, 3, 32, 32)).sum().backward()  # training goes on
print("RESULT", a == b, a)
dist.destroy_process_group()
"""


def test_evaluate_encoder_on_fsdp2_sharded_encoder(data_dir):
    """The trainer's FSDP2 encoder (root + per-block fully_shard): same numbers as the plain model."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(data_dir)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RESULT True" in out.stdout, out.stdout
