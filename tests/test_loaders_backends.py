"""Loader backends on CPU: cpu, nvjpeg (its batched path run on CPU tensors), dali
(CPU-only pipeline) and ffcv. Same shards, same spec: shapes, dtype, normalization,
undecodable samples skipped and counted, crops that match (per sample where the backend
shares the cpu backend's RNG, in distribution for ffcv), and exact mid-epoch resume."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, os.path.dirname(__file__))
from backend_fixtures import (  # noqa: E402
    BAD, CONST_COLOURS, GRAD_H, GRAD_W, SPEC, crop_stats, drop_segment, recover_crop, reference_stats, run_epochs,
    unnormalize, write_shards,
)

from loaders import available_backends, build_loader  # noqa: E402
from loaders.augment import sample_crop  # noqa: E402
from loaders.backends.cpu import sample_generator  # noqa: E402
from loaders.backends.encoded import ImageHeaderError, probe_image  # noqa: E402
from loaders.backends.nvjpeg import NvjpegLoader, resized_crop_batch, resized_crop_list  # noqa: E402
from loaders.loader import as_stream_specs  # noqa: E402
from loaders.shards import encode_image  # noqa: E402

HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None
HAVE_FFCV = importlib.util.find_spec("ffcv") is not None
BACKENDS = [
    "cpu",
    "nvjpeg",
    pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")),
    pytest.param("ffcv", marks=pytest.mark.skipif(not HAVE_FFCV, reason="ffcv not installed")),
]
SAME_RNG = ("cpu", "nvjpeg", "dali")  # backends that cut exactly the cpu backend's crops
BATCH, SEED, EPOCHS, SNAPSHOT = 16, 5, 2, 3
DTYPE = torch.bfloat16


# ----------------------------------------------------------------- pure functions
def test_probe_image_reads_headers_and_rejects_broken_files():
    rgb = encode_image(np.zeros((37, 53, 3), np.uint8))
    gray = encode_image(np.zeros((20, 11), np.uint8))
    png = encode_image(np.zeros((9, 14, 3), np.uint8), "png")
    assert probe_image(rgb) == ("jpeg", 37, 53, 3)
    assert probe_image(gray) == ("jpeg", 20, 11, 1)
    assert probe_image(png) == ("png", 9, 14, 3)
    for broken in (b"hello world" * 5, rgb[: len(rgb) // 2], rgb[:20], b""):
        with pytest.raises(ImageHeaderError):
            probe_image(broken)
    # header intact, tables missing: the header probe cannot tell (the decoder must)
    assert probe_image(drop_segment(rgb, 0xDB))[0] == "jpeg"


@pytest.mark.parametrize("shape", [(3, 97, 131), (1, 64, 48)])
def test_batched_crop_matches_torchvision_resized_crop(shape):
    c, h, w = shape
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, c, h, w), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    images[0] = ((3 * xx + yy) % 256).to(torch.uint8)  # smooth content too
    crops = [[0, 0, h, w, 0], [1, 2, h - 3, w - 5, 1], [5, 7, 20, 30, 0], [h // 2, w // 3, h // 2, w // 2, 1],
             [0, 3, h, w // 2, 0], [10, 10, 9, 11, 1], [3, 0, 2, 3, 0], [h - 40, w - 40, 40, 40, 1]]
    crops = torch.tensor(crops)
    for size in (16, 32, 100):  # shrink (antialiased) and enlarge
        out = resized_crop_batch(images, crops, size)
        assert out.shape == (8, c, size, size) and out.dtype == torch.float32
        for b in range(8):
            top, left, ch, cw, flip = crops[b].tolist()
            ref = TF.resized_crop(images[b], top, left, ch, cw, [size, size], antialias=True).float()
            ref = ref.flip(-1) if flip else ref
            diff = (out[b] - ref).abs()
            assert diff.max() <= 1.0 + 1e-3, (size, b, diff.max())  # torchvision rounds to uint8
            assert diff.mean() < 0.5


def test_crop_list_groups_sizes_and_expands_gray():
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in
              [(3, 40, 50), (1, 30, 30), (3, 40, 50), (3, 30, 30), (1, 40, 50)]]
    crops = torch.tensor([[0, 0, 40, 50, 0], [2, 3, 20, 25, 1], [5, 5, 30, 30, 1], [0, 0, 30, 30, 0],
                          [1, 1, 38, 20, 0]])
    out = resized_crop_list(images, crops, 24)
    assert out.shape == (5, 3, 24, 24)
    for i, img in enumerate(images):
        ref = resized_crop_batch(img.expand(3, -1, -1)[None], crops[i : i + 1], 24)[0]
        torch.testing.assert_close(out[i], ref)


def test_backend_availability_on_cpu():
    names = available_backends("cpu")
    assert "cpu" in names and "nvjpeg" not in names  # nvjpeg decodes with CUDA only
    assert ("dali" in names) == HAVE_DALI and ("ffcv" in names) == HAVE_FFCV


# ----------------------------------------------------------------- loaders
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("backend_shards")
    uids = write_shards(str(root / "mds"))
    return str(root / "mds"), {u: i for i, u in enumerate(uids)}, str(root / "cache")


def make_loader(backend: str, path: str, cache: str, **kw):
    kw = dict(batch_size=BATCH, augment=SPEC, device="cpu", dtype=DTYPE, seed=SEED, num_workers=2, cache_dir=cache) | kw
    if backend == "nvjpeg":  # not offered on CPU; its code path runs unchanged on CPU tensors
        return NvjpegLoader(streams=as_stream_specs(path), device=torch.device("cpu"), shuffle=True,
                            num_canonical_nodes=None, **{k: v for k, v in kw.items() if k != "device"})
    return build_loader(path, backend=backend, **kw)


_RUNS: dict[str, tuple] = {}


@pytest.fixture
def run(shards, request):
    """(loader, epochs of batches, state after SNAPSHOT batches of epoch 0), once per backend."""
    backend = request.param
    if backend not in _RUNS:
        loader = make_loader(backend, shards[0], shards[2])
        epochs, state = run_epochs(loader, EPOCHS, snapshot_after=SNAPSHOT)
        _RUNS[backend] = (loader, epochs, state)
    return (backend, *_RUNS[backend])


def backends(fn):
    return pytest.mark.parametrize("run", BACKENDS, indirect=True)(fn)


@backends
def test_batches_have_contract_shape_dtype_and_tags(run, shards):
    backend, loader, epochs, _ = run
    index = shards[1]
    for batches in epochs:
        assert len(batches) == len(loader)
        seen = []
        for b in batches:
            assert b.images.shape == (len(b), 3, SPEC.size, SPEC.size)
            assert b.images.dtype == DTYPE and b.images.device.type == "cpu"
            assert b.images.is_contiguous()
            assert len(b.uid) == len(b.modality) == len(b.source) == len(b)
            assert all(m == "CT" for m in b.modality)
            assert all(s == u.split("/")[0] for s, u in zip(b.source, b.uid))
            assert torch.isfinite(b.images.float()).all()
            seen += b.uid
        assert len(seen) == len(set(seen)) and set(seen) <= set(index)


@backends
def test_undecodable_samples_are_skipped_and_counted(run):
    backend, loader, epochs, _ = run
    delivered = [u for batches in epochs for b in batches for u in b.uid]
    assert not set(delivered) & set(BAD)
    assert loader.skipped > 0
    if backend == "ffcv":  # bad rows are left out at conversion, counted once per epoch
        assert loader.skipped == len(BAD) * EPOCHS
        assert len(delivered) == EPOCHS * len(loader) * BATCH
    else:  # every position of the epoch is either delivered or counted as skipped
        assert len(delivered) + loader.skipped == EPOCHS * len(loader) * BATCH


@backends
def test_normalization_matches_spec(run):
    _, _, epochs, _ = run
    checked = 0
    for batches in epochs:
        for b in batches:
            for k, uid in enumerate(b.uid):
                if uid.startswith("const/"):
                    colour = torch.tensor(CONST_COLOURS[int(uid.split("/")[1])], dtype=torch.float32)
                    expect = (colour / 255 - torch.tensor(SPEC.mean)) / torch.tensor(SPEC.std)
                    got = b.images[k].float()
                    torch.testing.assert_close(got.mean((1, 2)), expect, atol=0.04, rtol=0)
                    assert got.std((1, 2)).max() < 0.04
                    checked += 1
    assert checked >= 8


@backends
def test_crops_match_the_spec(run, shards):
    backend, _, epochs, _ = run
    index = shards[1]
    crops = []
    for epoch, batches in enumerate(epochs):
        for b in batches:
            pixels = unnormalize(b.images)
            for k, uid in enumerate(b.uid):
                if not uid.startswith("grad/"):
                    continue
                got = recover_crop(pixels[k])
                crops.append(got)
                if backend in SAME_RNG:  # exactly the window the shared per-sample RNG draws
                    want = sample_crop(GRAD_H, GRAD_W, SPEC, sample_generator(SEED, epoch, index[uid]))
                    assert got[4] == want[4], (uid, got, want)
                    np.testing.assert_allclose(got[:4], want[:4], atol=1.5, err_msg=uid)
    stats, ref = crop_stats(crops), reference_stats()
    assert stats["n"] >= 200
    assert abs(stats["scale"] - ref["scale"]) < 0.06, (stats, ref)
    assert abs(stats["log_aspect"] - ref["log_aspect"]) < 0.06, (stats, ref)
    assert abs(stats["flip"] - SPEC.hflip) < 0.15, stats
    assert 0.75 < stats["scale_sd"] / ref["scale_sd"] < 1.33, (stats, ref)
    assert 0.75 < stats["log_aspect_sd"] / ref["log_aspect_sd"] < 1.33, (stats, ref)


@backends
def test_resume_mid_epoch_gives_exactly_the_remaining_samples(run, shards):
    backend, _, epochs, state = run
    assert state["epoch"] == 0 and state["batches_in_epoch"] == SNAPSHOT
    resumed = make_loader(backend, shards[0], shards[2], num_workers=1)  # worker count may change
    resumed.load_state_dict(state)
    rest, _ = run_epochs(resumed, 2)
    want = [u for b in epochs[0][SNAPSHOT:] for u in b.uid]
    assert [u for b in rest[0] for u in b.uid] == want
    assert [u for b in rest[1] for u in b.uid] == [u for b in epochs[1] for u in b.uid]  # next epoch as before
    if backend in SAME_RNG:  # same crops too
        for got, ref in zip(rest[0], epochs[0][SNAPSHOT:]):
            torch.testing.assert_close(got.images.float(), ref.images.float(), atol=0.02, rtol=0)


def test_same_order_across_streaming_backends():
    runs = {b: _RUNS[b] for b in SAME_RNG if b in _RUNS}
    if len(runs) < 2:
        pytest.skip("needs two backends run first (run the whole module)")
    orders = {b: [u for batches in r[1] for bt in batches for u in bt.uid] for b, r in runs.items()}
    first = next(iter(orders.values()))
    assert all(o == first for o in orders.values())


@pytest.mark.parametrize("backend", ["nvjpeg",
                                     pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="no dali")),
                                     pytest.param("ffcv", marks=pytest.mark.skipif(not HAVE_FFCV, reason="no ffcv"))])
def test_gpu_backends_reject_specs_they_do_not_implement(backend, shards):
    class OtherSpec:
        size = 32

    with pytest.raises(TypeError, match="AugmentSpec"):
        make_loader(backend, shards[0], shards[2], augment=OtherSpec())


@pytest.mark.parametrize("backend",
                         ["nvjpeg", pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="no dali"))])
def test_stream_priority_is_checked_before_any_work(backend, shards):
    """The GPU backends' `stream_priority`: normal and high build (high maps to the device's highest
    CUDA priority, 0 without CUDA); any other name fails with the valid ones listed."""
    from loaders.backends.encoded import cuda_priority

    assert cuda_priority("normal") == 0
    assert cuda_priority("high") == (torch.cuda.Stream.priority_range()[1] if torch.cuda.is_available() else 0)
    loader = make_loader(backend, shards[0], shards[2], stream_priority="high")
    batch = next(iter(loader))  # (the shards hold one undecodable sample: a batch may be one short)
    assert loader.stream_priority == "high" and batch.images.shape[0] == len(batch) >= BATCH - 1
    loader.close()
    with pytest.raises(ValueError, match="normal, high"):
        make_loader(backend, shards[0], shards[2], stream_priority="urgent")


@pytest.mark.skipif(not HAVE_FFCV, reason="ffcv not installed")
def test_ffcv_conversion_is_cached_and_lists_failures(run, shards):
    import json

    from loaders.backends.ffcv import beton_for

    (root,) = [p for p in os.scandir(os.path.join(shards[2], "ffcv"))]
    beton = os.path.join(root.path, "data.beton")
    table = json.load(open(os.path.join(root.path, "table.json")))
    assert sorted(u for u, _ in table["failed"]) == sorted(BAD)
    assert len(table["uid"]) == len(shards[1])
    mtime = os.path.getmtime(beton)
    again = beton_for(as_stream_specs(shards[0]), cache_dir=shards[2], num_workers=1, rank=0)
    assert str(again) == root.path and os.path.getmtime(beton) == mtime


test_ffcv_conversion_is_cached_and_lists_failures = pytest.mark.parametrize(
    "run", [pytest.param("ffcv")], indirect=True)(test_ffcv_conversion_is_cached_and_lists_failures)


def test_prefetch_meter_tells_a_slow_producer_from_a_slow_consumer():
    """PrefetchMeter: with a producer slower than the consumer the consumer's time goes to waiting
    for data; with a slower consumer the producer's goes to waiting on a full queue."""
    import time as _time

    from loaders.backends.encoded import PrefetchMeter, prefetch

    def produce(pause):
        for i in range(8):
            _time.sleep(pause)
            yield i, []

    slow_producer = PrefetchMeter()
    before = slow_producer.snapshot()
    assert list(prefetch(lambda: produce(0.03), torch.device("cpu"), depth=2, meter=slow_producer)) == list(range(8))
    m = PrefetchMeter.per_item(before, slow_producer.snapshot())
    assert m["items"] == 8 and m["wait_ms"] > 15 and m["produce_ms"] > 25 and m["full_ms"] < 10
    assert m["throttle_ms"] < 1 and m["pending_share"] == 0  # no max_ahead and no events on CPU

    slow_consumer = PrefetchMeter()
    for _ in prefetch(lambda: produce(0.0), torch.device("cpu"), depth=2, meter=slow_consumer):
        _time.sleep(0.03)
    m = PrefetchMeter.per_item(PrefetchMeter().snapshot(), slow_consumer.snapshot())
    assert m["items"] == 8 and m["wait_ms"] < 10 and m["full_ms"] > 15 and m["produce_ms"] < 10


def test_prefetch_passes_errors_on_and_stops_early():
    import threading

    from loaders.backends.encoded import prefetch

    produced = []

    def produce():
        for i in range(1000):
            produced.append(i)
            yield i, []

    got = []
    for item in prefetch(produce, torch.device("cpu"), depth=2):
        got.append(item)
        if len(got) == 3:
            break
    assert got == [0, 1, 2] and len(produced) <= 3 + 2 + 1  # the producer stopped soon after
    assert not [t for t in threading.enumerate() if t.name == "loader-prefetch"]

    def failing():
        yield 1, []
        raise ValueError("decoder exploded")

    with pytest.raises(ValueError, match="decoder exploded"):
        list(prefetch(failing, torch.device("cpu")))


@pytest.mark.skipif(not HAVE_FFCV, reason="ffcv not installed")
def test_ffcv_refuses_stream_mixing(shards):
    with pytest.raises(ValueError, match="proportion"):
        build_loader([{"path": shards[0], "proportion": 0.5}], backend="ffcv", batch_size=4, device="cpu",
                     cache_dir=shards[2])


def test_fast_shard_reader_matches_streaming(shards):
    from streaming import StreamingDataset

    from loaders.backends.encoded import (ShardMaps, as_torch, collate_encoded, encoded_views, make_encoded_dataset,
                                          select)

    ds = make_encoded_dataset(as_stream_specs(shards[0]), batch_size=4, shuffle=False, seed=0, cache_dir=None,
                              num_canonical_nodes=None, augment=SPEC, decode_png=False)
    refs = [StreamingDataset.get_item(ds, i) for i in range(ds.num_samples)]
    for i, ref in enumerate(refs):
        shard_id, rel = ds.spanner[i]
        fast = ds.reader(shard_id).get(rel)
        assert {k: fast[k] for k in ("image", "uid", "modality", "source")} == \
            {k: ref[k] for k in ("image", "uid", "modality", "source")}
    # local shards: workers send (shard, offset, size), the main process reads the bytes in place
    rows = [ds.get_item(i) for i in range(ds.num_samples)]
    jpeg = [i for i, r in enumerate(rows) if "data" in r]
    assert jpeg and all("loc" in rows[i] for i in jpeg)
    raw = as_torch(collate_encoded(rows))
    assert raw["locs"].shape == (len(jpeg), 3) and "bytes" not in raw
    views = encoded_views(raw, ShardMaps(ds))
    assert [v.tobytes() for v in views] == [refs[i]["image"] for i in jpeg]
    kept = select(raw, [0, 2])
    assert "locs" not in kept and [v.tobytes() for v in encoded_views(kept, None)] == [refs[jpeg[0]]["image"],
                                                                                          refs[jpeg[2]]["image"]]
    # a bounded set of open maps (each holds a file descriptor): views stay right when maps are dropped
    small = ShardMaps(ds, limit=1)
    raw.pop("encoded")
    assert [v.tobytes() for v in encoded_views(raw, small)] == [refs[i]["image"] for i in jpeg]
    assert len(small.maps) == 1 and len({int(s) for s in raw["locs"][:, 0]}) > 1
    # without offsets (e.g. a remote stream that may evict), the bytes travel in one buffer
    for r in rows:
        r.pop("loc", None)
    flat = as_torch(collate_encoded(rows))
    assert "locs" not in flat and [v.tobytes() for v in encoded_views(flat, None)] == [refs[i]["image"] for i in jpeg]
    assert len(ds._fast_readers) > 1  # several shards, each through the memory-mapped path
    ds._fast_readers.clear()
    ds._fast_readers.limit = 1  # a worker keeps few maps open; rows read after evictions are still right
    again = [ds.get_item(i) for i in range(ds.num_samples)]
    assert len(ds._fast_readers) == 1
    assert [bytes(r["data"]) for r in again if "data" in r] == [refs[i]["image"] for i in jpeg]


def test_sample_rng_is_python_random_with_the_sample_key():
    """SampleRNG seeds in C directly (a worker's hot path); the stream must stay exactly
    random.Random(key)'s, or crops would change between releases."""
    import random

    from loaders.augment import SampleRNG

    for key in (0, 1, 2**62 + 12345, 987654321):
        ours, ref = SampleRNG(key), random.Random(key)
        assert [ours.random() for _ in range(40)] == [ref.random() for _ in range(40)]
        assert ours.gauss(0, 1) == ref.gauss(0, 1) and ours.randint(0, 10**9) == ref.randint(0, 10**9)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
@pytest.mark.parametrize("settings", [{"no_copy": True}, {"exec_dynamic": False}, {"stream_policy": "single"},
                                      {"stage_inputs": True}],
                         ids=["no_copy", "legacy_executor", "single_stream", "staged"])
def test_dali_no_copy_feed_gives_the_same_batches(run, shards, settings):
    """no_copy=True: DALI reads the fed image views in place (shard maps / batch buffers kept
    alive until their batch comes back); same samples, crops and skips as the copying feed. The
    same with DALI's legacy executor (exec_dynamic=False) and with one CUDA stream for all of DALI's
    operators (stream_policy="single"), and with each batch's JPEGs copied into one buffer first
    (stage_inputs); a policy DALI does not have fails before any work. The producer's timing
    counts every batch it decoded."""
    _, _, epochs, _ = run
    loader = make_loader("dali", shards[0], shards[2], **settings)
    try:
        batches = list(loader)
    finally:
        loader.close()
    assert loader.timing["batches"] == len(batches)
    assert loader.timing["run_s"] > 0 and 0 <= loader.timing["feed_wait_s"] <= loader.timing["run_s"]
    ref = epochs[0]
    assert [b.uid for b in batches] == [b.uid for b in ref]
    for ours, theirs in zip(batches, ref):
        torch.testing.assert_close(ours.images, theirs.images, rtol=0, atol=0)
    assert loader.skipped == len(BAD)
    with pytest.raises(ValueError, match="single, backend, operator"):
        make_loader("dali", shards[0], shards[2], stream_policy="many")


test_dali_no_copy_feed_gives_the_same_batches = pytest.mark.parametrize(
    "run", [pytest.param("dali")], indirect=True)(test_dali_no_copy_feed_gives_the_same_batches)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
@pytest.mark.parametrize("decode_crop", [False, True])
def test_dali_ignores_exif_orientation_like_the_other_backends(decode_crop):
    """A JPEG whose EXIF says "rotate 90": the crops are drawn from its frame header's size (probe_image) and
    the other backends decode the pixels as stored, so DALI must not turn it (its decoders do by default):
    a flipped crop of the stored 40 x 80 image comes out as the cpu backend's decode + crop gives it."""
    import io

    from PIL import Image

    from loaders.augment import AugmentSpec
    from loaders.backends.cpu import decode
    from loaders.backends.dali import build_pipeline, crop_box, input_names, roi

    h, w = 40, 80
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx * 255 // w, yy * 255 // h, (xx + 2 * yy) % 256], -1).astype(np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    data = np.frombuffer(buf.getvalue(), np.uint8)
    assert probe_image(data.tobytes())[1:3] == (h, w)
    crops = np.array([[4, 10, 30, 50, 1]])  # top, left, h, w, flip
    spec = AugmentSpec(size=16)
    pipe = build_pipeline(batch_size=1, sizes=[16], normalize=True, mean=spec.mean, std=spec.std,
                          device=torch.device("cpu"), out_dtype=torch.float32, num_threads=1, hw_decoder_load=1.0,
                          prefetch_queue_depth=1, decode_crop=decode_crop)
    inputs = [[data]] + list(crop_box(crops) if decode_crop else roi(crops))
    out = pipe.run(**dict(zip(input_names(1, decode_crop), inputs)))
    got = unnormalize(torch.from_numpy(np.array(out[0].as_tensor())), spec)[0]
    stored = decode(data.tobytes())
    assert stored.shape == (3, h, w)
    want = resized_crop_batch(stored[None], torch.tensor(crops), 16)[0]
    assert (got - want).abs()[:, 2:-2, 2:-2].mean() < 3.0, (got - want).abs().mean()


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
@pytest.mark.parametrize("decode_crop", [False, True])
def test_dali_huffman_threshold_reaches_the_decoder(monkeypatch, decode_crop):
    """DaliLoader's hybrid_huffman_threshold is passed to DALI's decoder (either one) when set and left out (DALI's
    default) when None; the pipeline built with it decodes the same pixels; a negative one is refused."""
    import io
    import types as pytypes

    from PIL import Image

    from loaders.augment import AugmentSpec
    from loaders.backends import dali

    real = dali.fn
    seen = []

    def recording(op):
        def call(*args, **kwargs):
            seen.append(kwargs.get("hybrid_huffman_threshold", "unset"))
            return op(*args, **kwargs)
        return call

    decoders = pytypes.SimpleNamespace(image=recording(real.decoders.image),
                                       image_slice=recording(real.decoders.image_slice))
    monkeypatch.setattr(dali, "fn", pytypes.SimpleNamespace(
        decoders=decoders, external_source=real.external_source, resize=real.resize,
        crop_mirror_normalize=real.crop_mirror_normalize, transpose=real.transpose))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 80, 3), dtype=np.uint8)).save(buf, format="JPEG")
    data = np.frombuffer(buf.getvalue(), np.uint8)
    crops = np.array([[4, 10, 30, 50, 0]])
    spec = AugmentSpec(size=16)
    outs = []
    for threshold in (None, 0):
        pipe = dali.build_pipeline(batch_size=1, sizes=[16], normalize=True, mean=spec.mean, std=spec.std,
                                   device=torch.device("cpu"), out_dtype=torch.float32, num_threads=1,
                                   hw_decoder_load=1.0, prefetch_queue_depth=1, decode_crop=decode_crop,
                                   hybrid_huffman_threshold=threshold)
        inputs = [[data]] + list(dali.crop_box(crops) if decode_crop else dali.roi(crops))
        outs.append(np.array(pipe.run(**dict(zip(dali.input_names(1, decode_crop), inputs)))[0].as_tensor()))
    assert seen == ["unset", 0]
    np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="hybrid_huffman_threshold"):
        dali.DaliLoader(streams=[], batch_size=1, augment=spec, device=torch.device("cpu"), dtype=torch.float32,
                        shuffle=False, seed=0, num_workers=0, cache_dir=None, num_canonical_nodes=1,
                        hybrid_huffman_threshold=-1)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_decode_crop_gives_the_same_crops(run, shards):
    """decode_crop: DALI decodes only each sample's crop box (decoders.image_slice), resizes it whole and mirrors it
    in crop_mirror_normalize. Same samples, order and skips (the bad samples found one at a time through the
    same inputs) as the default pipeline, and the same pixels away from the crop's edge, where fn.resize's filter
    reads the neighbours outside the box; flipped crops included. A multi-crop spec is refused up front."""
    from loaders.multicrop import MultiCropSpec

    _, _, epochs, _ = run
    loader = make_loader("dali", shards[0], shards[2], decode_crop=True)
    try:
        batches = list(loader)
    finally:
        loader.close()
    ref = epochs[0]
    assert [b.uid for b in batches] == [b.uid for b in ref]
    assert loader.skipped == len(BAD)
    ours = torch.cat([b.images for b in batches]).float()
    theirs = torch.cat([b.images for b in ref]).float()
    inner = (ours - theirs)[..., 2:-2, 2:-2].abs()
    assert inner.max() < 0.05, inner.max()  # bf16 of normalized pixels: ~1/255 / std
    assert (ours - theirs).abs().mean() < 0.02
    # the gradient images' crops, read back from the pixels: the same windows and flips
    uids = [u for b in batches for u in b.uid]
    grads = [k for k, uid in enumerate(uids) if uid.startswith("grad/")]
    got = [recover_crop(unnormalize(ours[k:k + 1])[0]) for k in grads]
    want = [recover_crop(unnormalize(theirs[k:k + 1])[0]) for k in grads]
    assert len(grads) >= 8 and {g[4] for g in got} == {True, False}
    for g, w in zip(got, want):
        assert g[4] == w[4]
        np.testing.assert_allclose(g[:4], w[:4], atol=0.5)
    with pytest.raises(ValueError, match="one crop per image"):
        make_loader("dali", shards[0], shards[2], decode_crop=True, augment=MultiCropSpec())


test_dali_decode_crop_gives_the_same_crops = pytest.mark.parametrize(
    "run", [pytest.param("dali")], indirect=True)(test_dali_decode_crop_gives_the_same_crops)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_failure_reported_at_an_earlier_batch(run, shards, monkeypatch):
    """DALI may report a decode failure at the outputs of an earlier in-flight batch than the one holding
    the bad sample (seen with its legacy executor: a rare failure of the legacy-executor test above). The
    loader then finds every sample of that batch decodable, searches the other in-flight batches, and
    replays them without their bad samples: the same batches and skip count as a plain run, no error."""
    from loaders.backends.dali import DaliLoader

    _, _, epochs, _ = run
    bad = set(BAD)
    raised = []
    build = DaliLoader._pipeline

    class EarlyReport:  # the loader's source pipeline, failing once at a good batch while a bad one is in flight
        def __init__(self, loader, pipe):
            self.loader, self.pipe = loader, pipe

        def run(self):
            out = self.pipe.run()
            inflight = [r for r, _ in self.loader._feeds[0].inflight]
            if not raised and len(inflight) > 1 and not bad & set(inflight[0]["uid"]) and any(
                    bad & set(r["uid"]) for r in inflight[1:]):
                raised.append(1)
                raise RuntimeError("Critical error in pipeline: Error in CPU operator decoders.image (simulated)")
            return out

        def __getattr__(self, name):
            return getattr(self.pipe, name)

    def pipeline(self, source=None, batch_size=None):
        pipe = build(self, source, batch_size)
        return pipe if source is None else EarlyReport(self, pipe)

    monkeypatch.setattr(DaliLoader, "_pipeline", pipeline)
    loader = make_loader("dali", shards[0], shards[2])
    try:
        batches = list(loader)
    finally:
        loader.close()
    assert raised  # the early report happened
    assert [b.uid for b in batches] == [b.uid for b in epochs[0]]
    for ours, theirs in zip(batches, epochs[0]):
        torch.testing.assert_close(ours.images, theirs.images, rtol=0, atol=0)
    assert loader.skipped == len(BAD)


test_dali_failure_reported_at_an_earlier_batch = pytest.mark.parametrize(
    "run", [pytest.param("dali")], indirect=True)(test_dali_failure_reported_at_an_earlier_batch)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
@pytest.mark.parametrize("pipelines", [2, 3])
def test_dali_pipelines_in_turn_keep_the_epoch(run, shards, pipelines):
    """pipelines=n: batches are dealt to n DALI pipelines in turn and taken back in the same turn. Two epochs give
    the one-pipeline run's batches, in its order, with the same pixels and skips (the undecodable samples are
    found inside whichever pipeline holds them); a mid-epoch state resumes with exactly the remaining samples;
    a bad count is refused before any work."""
    _, _, epochs, state = run
    loader = make_loader("dali", shards[0], shards[2], pipelines=pipelines)
    try:
        got, snap = run_epochs(loader, EPOCHS, snapshot_after=SNAPSHOT)
        assert len(loader._pipes) == pipelines
    finally:
        loader.close()
    for ours, theirs in zip(got, epochs):
        assert [b.uid for b in ours] == [b.uid for b in theirs]
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert loader.skipped == EPOCHS * len(BAD)
    assert snap["batches_in_epoch"] == state["batches_in_epoch"] == SNAPSHOT
    resumed = make_loader("dali", shards[0], shards[2], pipelines=pipelines)
    try:
        resumed.load_state_dict(state)
        assert [u for b in resumed for u in b.uid] == [u for b in epochs[0][SNAPSHOT:] for u in b.uid]
    finally:
        resumed.close()
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="pipelines must be a positive int"):
            make_loader("dali", shards[0], shards[2], pipelines=bad)


test_dali_pipelines_in_turn_keep_the_epoch = pytest.mark.parametrize(
    "run", [pytest.param("dali")], indirect=True)(test_dali_pipelines_in_turn_keep_the_epoch)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_more_pipelines_than_batches(shards):
    """An epoch of fewer batches than pipelines (a pipeline gets none): the same two epochs as one pipeline, and an
    epoch left after one batch drops the pipelines, which the next epoch rebuilds."""
    kw = dict(batch_size=64)
    ref = make_loader("dali", shards[0], shards[2], **kw)
    many = make_loader("dali", shards[0], shards[2], pipelines=4, **kw)
    try:
        want, _ = run_epochs(ref, 2)
        got, _ = run_epochs(many, 2)
        assert 1 < len(want[0]) < 4
        assert [[b.uid for b in e] for e in got] == [[b.uid for b in e] for e in want]
        assert many.skipped == ref.skipped == 2 * len(BAD)
        for loader in (ref, many):  # one batch of the next epoch, then the loader goes on as one pipeline does
            it = iter(loader)
            next(it)
            it.close()
        assert many._pipes == []
        after = [b.uid for b in many]
        assert after and after == [b.uid for b in ref] and len(many._pipes) == 4
    finally:
        ref.close()
        many.close()


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_close_leaves_no_dali_garbage(shards):
    """close() collects what the loader leaves in reference cycles (DALI's graph nodes, operators and
    external sources, the epoch's DataLoader state) at once instead of at the cycle collector's next
    run: in the suite, a later DataLoader forked its workers beside that garbage and a worker segfaulted."""
    import gc

    gc.collect()
    gc.disable()  # only close() may collect
    try:
        loader = make_loader("dali", shards[0], shards[2])
        assert list(loader) and loader._pipes
        loader.close()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what is left for the collector lands in gc.garbage
        gc.collect()
        left = {type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("nvidia.dali")}
        assert left == set()
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_nvjpeg_decode_ahead_gives_the_same_batches_and_resumes(run, shards, monkeypatch):
    """decode_ahead=True decodes the next batch in a thread of its own while this one is cropped: the
    same samples, crops and skips as decoding in line (the default); a mid-epoch state resumes
    exactly; a consumer that stops early stops the decode thread."""
    import threading

    import loaders.backends.nvjpeg as nv

    _, inline, epochs, state = run  # the fixture's loader: default settings
    assert inline.decode_ahead is False
    threads: dict[str, set] = {"decode": set(), "crop": set()}
    crop = nv.resized_crop_list

    def crop_seen(*a, **k):
        threads["crop"].add(threading.get_ident())
        return crop(*a, **k)

    monkeypatch.setattr(nv, "resized_crop_list", crop_seen)

    def ahead_loader():
        loader = make_loader("nvjpeg", shards[0], shards[2], decode_ahead=True)
        decode = loader.decode
        loader.decode = lambda raw: threads["decode"].add(threading.get_ident()) or decode(raw)
        return loader

    loader = ahead_loader()
    try:
        batches = list(loader)
        assert [b.uid for b in batches] == [b.uid for b in epochs[0]]
        for ours, theirs in zip(batches, epochs[0]):
            torch.testing.assert_close(ours.images, theirs.images, rtol=0, atol=0)
        assert loader.skipped == len(BAD)
        assert threads["decode"] and threads["crop"] and not threads["decode"] & threads["crop"]
    finally:
        loader.close()
    loader = ahead_loader()
    try:
        loader.load_state_dict(state)  # SNAPSHOT batches into epoch 0
        rest = [u for b in loader for u in b.uid]
        assert rest == [u for b in epochs[0][SNAPSHOT:] for u in b.uid]
        it = iter(loader)
        next(it)
        it.close()
        assert not [t for t in threading.enumerate() if t.name == "loader-prefetch" and t.is_alive()]
    finally:
        loader.close()


test_nvjpeg_decode_ahead_gives_the_same_batches_and_resumes = pytest.mark.parametrize(
    "run", [pytest.param("nvjpeg")], indirect=True)(test_nvjpeg_decode_ahead_gives_the_same_batches_and_resumes)


def test_throttle_waits_on_the_oldest_marks_beyond_max_ahead():
    """The loader's max_ahead logic (on CUDA the marks are events on the consumer's stream): after
    each item handed out at most `max_ahead` marks stay pending, the oldest are waited on first."""
    from loaders.backends.encoded import Throttle

    waited, made = [], []

    class Mark:
        def __init__(self):
            self.i = len(made)
            made.append(self)

        def synchronize(self):
            waited.append(self.i)

    throttle = Throttle(2, Mark)
    for _ in range(5):
        throttle.step()
    assert waited == [0, 1, 2] and [m.i for m in throttle.pending] == [3, 4]
    with pytest.raises(ValueError):
        Throttle(0, Mark)


def test_prepare_cuda_sets_the_hardware_queues_only_when_it_can(monkeypatch, caplog):
    """loaders.prepare_cuda: 32 CUDA hardware queues unless the environment chose; "late" (and
    build_loader's one warning for a GPU decoder) once CUDA has started, when it cannot apply."""
    import loaders.loader as L
    from loaders import prepare_cuda

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert prepare_cuda() == "set" and os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "32"
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    assert prepare_cuda() == "kept" and os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert prepare_cuda() == "late" and "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    monkeypatch.setattr(L, "_warned_connections", False)
    with caplog.at_level("WARNING", logger="loaders"):
        L._check_cuda_queues(torch.device("cpu"), "dali")  # CPU: nothing to say
        assert not caplog.records
        L._check_cuda_queues(torch.device("cuda", 0), "cpu")  # the CPU decoder has no device streams
        assert not caplog.records
        L._check_cuda_queues(torch.device("cuda", 0), "dali")
        L._check_cuda_queues(torch.device("cuda", 0), "nvjpeg")  # once per process
    assert len(caplog.records) == 1 and "CUDA_DEVICE_MAX_CONNECTIONS=32" in caplog.text


@pytest.mark.parametrize("backend", ["nvjpeg", "cpu"])  # the encoded datasets' class and the cpu backend's
def test_epoch_start_barrier_polls_fast(shards, monkeypatch, backend):
    """Each worker's epoch start passes streaming's shared barrier (a file lock plus a shared-memory
    count) three times; filelock polls a lost race every 50 ms and the barrier's wait loop every 7 ms,
    which made an epoch boundary cost ~200 ms on a 2-core machine. The loaders' datasets' epoch start
    swaps in a lock that polls every BARRIER_POLL_S (it pickles as a fresh lock on the same file) and
    lowers the wait loop's tick; epochs still deliver full, duplicate-free batches."""
    import pickle

    import streaming.base.shared.barrier as shared_barrier

    from loaders.backends.barrier import BARRIER_POLL_S, FastPollLock, fast_epoch_barrier

    monkeypatch.setattr(shared_barrier, "TICK", 0.007)
    loader = make_loader(backend, shards[0], shards[2], num_workers=0)  # the epoch start runs in this process
    try:
        barrier = loader.dataset._shared_barrier
        assert not isinstance(getattr(barrier, "lock", None), FastPollLock)
        epochs = [[u for b in loader for u in b.uid] for _ in range(2)]
        assert isinstance(barrier.lock, FastPollLock) and shared_barrier.TICK == BARRIER_POLL_S
        assert len(epochs[0]) == len(epochs[1]) > 0 and all(len(set(e)) == len(e) for e in epochs)
        lock = barrier.lock
        fast_epoch_barrier(loader.dataset)  # idempotent: the same lock stays
        assert barrier.lock is lock
        clone = pickle.loads(pickle.dumps(lock))
        assert isinstance(clone, FastPollLock) and clone.path == lock.path
        seen = []
        monkeypatch.setattr(lock._lock, "acquire", lambda *a, **k: seen.append(k.get("poll_interval")))
        monkeypatch.setattr(lock._lock, "release", lambda *a, **k: None)
        with lock:
            pass
        assert seen == [BARRIER_POLL_S]
    finally:
        loader.close()
