"""`python -m bench loaders`: images/s delivered to the training device by each loader
backend, against the loader people would otherwise write (PyTorch DataLoader + PIL +
torchvision v2 RandomResizedCrop), from real MDS shards of synthetic 256-px and 512-px
JPEGs (~27 KB and ~106 KB, like photos of that size). With `--stall`, also the data stall
of an MAE training step: 1 - (img/s with real data) / (img/s with a synthetic batch).

For each (backend, image size) it reports images/s (a batch counts once it is on the
device and the device has synchronized), CPU cores busy (process + worker CPU time / wall
time) and the GPU's busy share while loading. Each backend runs on its own: one that
fails records its error and the others still run; results are written after each one.

    python -m bench loaders                          # all backends, 256 and 512 px, 2 workers
    python -m bench loaders --workers 4,15 --stall   # + the PIL baseline with more cores, + MAE stall
    python -m bench loaders --sizes 256 --stall --stall-backends dali,nvjpeg --compile model \
        --compile-mode reduce-overhead --stall-repeats 3   # the stall with the step as CUDA graphs
    python -m bench loaders --tiny                   # seconds on a CPU: checks the script end to end

CUDA gets 32 hardware queues (loaders.prepare_cuda) unless CUDA_DEVICE_MAX_CONNECTIONS is set.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import faulthandler
import gc
import io
import inspect
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from bench.common import bar_plot, card_name, print_table, write_result

ALL_BACKENDS = ("dali", "nvjpeg", "ffcv", "cpu", "pil")
BASELINE = "pil"


# ----------------------------------------------------------------- data
def synthetic_photo(seed: int, size: int) -> np.ndarray:
    """RGB content that compresses like a photo: smooth colour fields, discs, sensor noise
    (q90 JPEG: ~28 KB at 256 px, ~105 KB at 512 px)."""
    from PIL import Image

    rng = np.random.default_rng(seed)

    def smooth(k: int) -> np.ndarray:
        coarse = (rng.random((k + 1, k + 1, 3)) * 255).astype(np.uint8)
        return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255

    img = 0.6 * smooth(4) + 0.4 * smooth(24)
    y, x = np.mgrid[0:size, 0:size] / size
    for _ in range(6):
        cx, cy, r = rng.random(3)
        disc = (x - cx) ** 2 + (y - cy) ** 2 < (0.05 + 0.2 * r) ** 2
        img[disc] = img[disc] * 0.3 + 0.7 * rng.random(3)
    img += rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _encoded_photo(args: tuple[int, int]) -> bytes:
    from loaders.shards import encode_image

    seed, size = args
    return encode_image(synthetic_photo(seed, size), "jpeg", quality=90)


def build_shards(root: Path, size: int, rows: int, distinct: int, workers: int) -> dict[str, Any]:
    """MDS shards of `rows` JPEGs (`distinct` different images, repeated under distinct uids). A set that an
    earlier run left under the same `root` (--data-dir) with the same size, rows and distinct images is
    reused as it is (the images are deterministic): building 100k + 64k rows takes ~45 s of device time."""
    from loaders.shards import ShardWriter

    out = root / f"jpeg{size}"
    meta = out / "bench-shards.json"
    want = {"size": size, "rows": rows, "distinct": distinct}
    if meta.is_file() and (out / "index.json").is_file():
        try:
            info = json.loads(meta.read_text())
        except ValueError:
            info = {}
        if {k: info.get(k) for k in want} == want:
            return {"path": str(out), "rows": rows, "distinct": distinct, "mean_kb": info["mean_kb"], "reused": True}
    if out.exists():
        shutil.rmtree(out)
    args = [(i, size) for i in range(distinct)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            images = pool.map(_encoded_photo, args)
    else:
        images = [_encoded_photo(a) for a in args]
    with ShardWriter(str(out), size_limit="128mb") as w:
        for i in range(rows):
            data = images[i % distinct]
            w.write({"image": data, "height": size, "width": size, "channels": 3, "modality": "OTHER",
                     "source": "bench", "uid": f"bench/{size}/{i}", "label": -1, "meta": {}})
    mean_kb = float(np.mean([len(b) for b in images]) / 1024)
    meta.write_text(json.dumps(want | {"mean_kb": mean_kb}))  # written last: a set cut short is never reused
    return {"path": str(out), "rows": rows, "distinct": distinct, "mean_kb": mean_kb}


# ----------------------------------------------------------------- the baseline
def multicrop_spec(crop: int):
    """DINOv2's crops as the /14 recipes cut them: 2 x `crop` global + 8 x 98 px local."""
    from loaders.multicrop import MultiCropSpec

    return MultiCropSpec(global_size=crop, local_size=98)


def pil_multicrop_transform(spec):
    """DINOv2's multi-crop as commonly written with torchvision v2 on PIL images, per crop:
    RandomResizedCrop, flip, colour jitter (p 0.8), grayscale (p 0.2), blur, solarize."""
    from torchvision.transforms import v2

    def one(size, scale, blur, solarize):
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=scale, ratio=spec.ratio, antialias=True),
            v2.RandomHorizontalFlip(spec.hflip),
            v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)],
                           p=spec.color_jitter),
            v2.RandomGrayscale(spec.grayscale),
            v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=blur),
            v2.RandomSolarize(128, p=solarize),
            v2.PILToTensor(),
        ])

    crops = [one(spec.global_size, spec.global_scale, spec.blur[min(i, 1)], spec.solarize[min(i, 1)])
             for i in range(spec.global_crops)]
    crops += [one(spec.local_size, spec.local_scale, spec.blur[2], spec.solarize[2])] * spec.local_crops
    return lambda img: tuple(t(img) for t in crops)


def pil_loader(path: str, *, batch_size: int, crop: int, workers: int, device: torch.device, dtype: torch.dtype,
               multicrop: bool = False):
    """What a user would write: StreamingDataset rows -> PIL decode -> torchvision v2
    RandomResizedCrop + flip (multicrop: DINOv2's 10 crops with their colour ops) in DataLoader
    workers -> pinned uint8 -> device -> normalize."""
    from streaming import StreamingDataset
    from torchvision.transforms import v2

    from loaders.augment import AugmentSpec, normalize

    spec = AugmentSpec(size=crop)
    if multicrop:
        transform = pil_multicrop_transform(multicrop_spec(crop))
    else:
        transform = v2.Compose([
            v2.PILToTensor(),
            v2.RandomResizedCrop(crop, scale=spec.scale, ratio=spec.ratio, antialias=True),
            v2.RandomHorizontalFlip(spec.hflip),
        ])

    class PILDataset(StreamingDataset):
        def get_item(self, idx: int, retry: int = 7):
            from PIL import Image

            row = super().get_item(idx, retry)
            return transform(Image.open(io.BytesIO(row["image"])).convert("RGB"))

    dataset = PILDataset(local=path, shuffle=True, batch_size=batch_size)
    dl = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=True,
                                     pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                     prefetch_factor=4 if workers > 0 else None)

    class Wrapped:
        def __iter__(self):
            for x in dl:
                if isinstance(x, (list, tuple)):  # multi-crop: one [B, 3, s, s] per crop
                    yield [normalize(v.to(device, non_blocking=True), spec, dtype) for v in x]
                else:
                    yield normalize(x.to(device, non_blocking=True), spec, dtype)

        def close(self):
            from loaders.backends.encoded import shutdown_workers

            shutdown_workers(dl)

    return Wrapped()


def make_loader(backend: str, path: str, *, batch_size: int, crop: int, workers: int, device: torch.device,
                dtype: torch.dtype, cache_dir: str, options: dict[str, dict] | None = None, multicrop: bool = False):
    if backend == BASELINE:
        return pil_loader(path, batch_size=batch_size, crop=crop, workers=workers, device=device, dtype=dtype,
                          multicrop=multicrop)
    from loaders import AugmentSpec, build_loader

    augment = multicrop_spec(crop) if multicrop else AugmentSpec(size=crop)
    return build_loader(path, backend=backend, batch_size=batch_size, augment=augment, device=device,
                        dtype=dtype, num_workers=workers, cache_dir=cache_dir, seed=0,
                        **(options or {}).get(backend, {}))


def close(loader) -> None:
    """Workers first, then the dataset (see loaders.backends.encoded.shutdown_workers)."""
    if hasattr(loader, "close"):
        loader.close()


def images_of(batch) -> torch.Tensor:
    """A batch's images as one tensor (the first tensor of a multi-crop batch: global crops)."""
    x = batch if isinstance(batch, (torch.Tensor, list)) else batch.images
    return x[0] if isinstance(x, list) else x


def source_images(batch) -> int:
    """How many source images a batch holds (a multi-crop batch has several crops of each)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, list):  # the PIL baseline's multi-crop: one tensor per crop
        return batch[0].shape[0]
    return len(batch)


def forever(loader, starts: list[int] | None = None) -> Iterator[tuple[torch.Tensor, int]]:
    """(images, source image count) of each batch, epoch after epoch; `starts` gets the running
    index of each epoch's first batch."""
    total = 0
    while True:
        n = 0
        for batch in loader:
            if n == 0 and starts is not None:
                starts.append(total)
            n += 1
            total += 1
            yield images_of(batch), source_images(batch)
        if n == 0:
            raise RuntimeError("the loader yielded no batch in an epoch (too few samples for the batch size?)")


# ----------------------------------------------------------------- meters
def cpu_seconds() -> float:
    """CPU time of this process and all its descendants, live and finished (psutil if
    installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        return _proc_cpu_seconds()
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return total


def _proc_cpu_seconds() -> float:
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
            stats[int(entry)] = (int(fields[1]), [int(x) for x in fields[11:15]])  # ppid; utime stime cutime cstime
    me = os.getpid()
    total = sum(stats[me][1]) if me in stats else 0
    family, frontier = {me}, [me]
    while frontier:  # live descendants
        kids = [pid for pid, (ppid, _) in stats.items() if ppid in frontier and pid not in family]
        family.update(kids)
        frontier = kids
        total += sum(sum(stats[k][1][:2]) for k in kids)
    return total / tick


class GPUBusy:
    """Samples the device's busy share (NVML utilization) in a thread; None without NVML."""

    def __init__(self, device: torch.device, every: float = 0.1):
        self.device, self.every, self.samples = device, every, []
        self._stop = threading.Event()
        self.ok = False
        if device.type == "cuda":
            try:
                torch.cuda.utilization(device)
                self.ok = True
            except Exception:
                pass

    def __enter__(self):
        if self.ok:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:
                pass

    def __exit__(self, *exc):
        self._stop.set()
        if self.ok:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) / 100 if self.samples else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(loader, *, seconds: float, warmup: int, device: torch.device) -> dict[str, Any]:
    starts: list[int] = []
    batches = forever(loader, starts)
    t_start = time.perf_counter()
    for _ in range(warmup):
        next(batches)
    sync(device)
    startup = time.perf_counter() - t_start
    n, count, arrivals = 0, 0, []
    meter, timing = getattr(loader, "meter", None), getattr(loader, "timing", None)
    m0, d0 = meter.snapshot() if meter is not None else None, dict(timing) if timing is not None else None
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    with GPUBusy(device) as busy:
        while time.perf_counter() - t0 < seconds:
            x, k = next(batches)
            arrivals.append(time.perf_counter())
            n += k
            count += 1
        sync(device)
        wall = time.perf_counter() - t0
    cores = (cpu_seconds() - cpu0) / wall
    epoch = epoch_boundaries(arrivals, [i - warmup for i in starts if i > warmup])
    out = {"img_s": n / wall, "images": n, "batches": count, "wall_s": wall, "cpu_cores": cores,
           "gpu_busy": busy.mean, "startup_s": startup, "shape": list(x.shape),
           "dtype": str(x.dtype).replace("torch.", "")}
    out |= epoch
    if meter is not None:  # the consumer's and the producer thread's waits, ms per batch
        out["prefetch"] = type(meter).per_item(m0, meter.snapshot())
    if timing is not None:  # the decoder's producer-side split (DaliLoader.timing), ms per batch
        k = max(1, timing["batches"] - d0["batches"])
        out["decoder_ms"] = {key.replace("_s", "_ms"): (timing[key] - d0[key]) * 1e3 / k
                             for key in timing if key != "batches"}
    batches.close()
    return out


def epoch_boundaries(arrivals: list[float], firsts: list[int]) -> dict[str, Any]:
    """What an epoch boundary costs the consumer: the gap before each new epoch's first batch (indices
    into `arrivals`, the measured batches' arrival times) beyond the median gap between batches."""
    gaps = np.diff(arrivals)
    at = [i - 1 for i in firsts if 1 <= i < len(arrivals)]
    if len(gaps) < 2 or not at:
        return {"epochs_started": len(at)}
    usual = float(np.median(gaps))
    return {"epochs_started": len(at), "batch_gap_ms": usual * 1e3,
            "epoch_boundary_ms": float(np.mean([gaps[i] for i in at]) - usual) * 1e3}


# ----------------------------------------------------------------- MAE stall
def stall_patch(crop: int) -> int:
    """Patch size of the stall model: 16 px, or 8 for small (--tiny) crops."""
    return 16 if crop % 16 == 0 and crop >= 64 else 8


def build_train_step(model_name: str, crop: int, device: torch.device, compile: str | bool, kernels: str = "auto",
                     compile_mode: str | None = None):
    """An MAE training step (the engine's MaskedAutoencoder if present, else a timm ViT
    forward/backward), bf16 autocast, fused AdamW; no host sync inside. kernels: "auto"
    (the engine's Triton kernels on CUDA) or "torch" (SDPA and torch masking)."""
    kind = f"engine.objectives.mae.MaskedAutoencoder (kernels={kernels})"
    try:
        from engine.models import attention_layer, create_encoder, use_triton
        from engine.objectives.mae import MaskedAutoencoder

        attn = attention_layer(kernels, device)
        encoder = create_encoder(model_name, img_size=crop, patch_size=stall_patch(crop), attn_layer=attn)
        model = MaskedAutoencoder(encoder, impl="triton" if use_triton(kernels, device) else "torch", attn_layer=attn)

        def loss_of(x):
            return model(x)["loss"]
    except ImportError as e:
        import timm

        kind = f"timm {model_name} forward/backward (engine MAE unavailable: {e})"
        model = timm.create_model(model_name, num_classes=0, img_size=crop)

        def loss_of(x):
            return model(x).float().pow(2).mean()

    model.to(device).train()
    from engine.config import CUDA_GRAPH_MODES

    graphs = compile_mode in CUDA_GRAPH_MODES  # CUDA graphs (cudagraph trees)
    if compile == "model":  # what the engine does for MAE on one GPU (model.compile: true)
        model.compile(mode=compile_mode)
    elif compile:  # "blocks" (or True): the encoder blocks only
        for block in getattr(getattr(model, "encoder", model), "blocks", []):
            block.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(x: torch.Tensor) -> torch.Tensor:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten
        with amp:
            loss = loss_of(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, kind


def profile_steps(step: Callable, batches: Iterator[tuple[torch.Tensor, int]], steps: int, device) -> dict:
    """GPU time per training step by CUDA stream over `steps` more steps (torch.profiler / CUPTI sees
    every kernel of the process, DALI's and nvJPEG's included): wall ms per step, and per stream the
    kernel ms per step (busy: the union of its kernels' intervals), kernel count and top kernels.
    The training step's stream is the one with the most kernel time."""
    if device.type != "cuda" or steps <= 0:
        return {}
    from torch.profiler import ProfilerActivity, profile

    try:
        # device activity, plus the CUDA runtime calls of every thread (which of them block: frees,
        # host allocations, synchronizations); aten ops are not recorded, so the host overhead stays small
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(next(batches)[0])
            sync(device)
            wall = time.perf_counter() - t0
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            with open(f.name) as trace:
                events = json.load(trace)["traceEvents"]
    except Exception as e:  # the profiler is a diagnostic: never fail the measurement for it
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    return stream_summary(events, steps, wall)


def stream_summary(events: list[dict], steps: int, wall: float) -> dict:
    """profile_steps' digest of Chrome-trace events (kernels, memcpys and memsets by stream)."""
    streams: dict[Any, dict] = {}
    for ev in events:
        if ev.get("ph") != "X" or ev.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        sid = (ev.get("args") or {}).get("stream", ev.get("tid"))
        st = streams.setdefault(sid, {"spans": [], "names": collections.Counter(), "count": 0})
        st["spans"].append((float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0))))
        st["names"][ev.get("name", "?")[:90]] += float(ev.get("dur", 0))
        st["count"] += 1
    out = {"steps": steps, "wall_ms_per_step": wall * 1e3 / steps, "streams": {}}
    for sid, st in streams.items():
        busy, end = 0.0, -1.0
        for a_, b_ in sorted(st["spans"]):
            if b_ > end:
                busy += b_ - max(a_, end)
                end = b_
        out["streams"][str(sid)] = {"busy_ms_per_step": busy / 1e3 / steps, "kernels_per_step": st["count"] / steps,
                                    "top": [[n, round(t / 1e3 / steps, 4)] for n, t in st["names"].most_common(6)]}
    out["runtime_api"] = runtime_calls(events, steps)
    ranked = sorted(out["streams"].items(), key=lambda kv: -kv[1]["busy_ms_per_step"])
    out["summary"] = f"{out['wall_ms_per_step']:.2f} ms/step wall; " + "; ".join(
        f"stream {k}: {v['busy_ms_per_step']:.2f} ms busy, {v['kernels_per_step']:.0f} ops" for k, v in ranked[:4])
    if ranked:
        out["gaps"] = training_gaps(streams, ranked[0][0], steps)
        g = out["gaps"]
        out["summary"] += (f"; training stream idle {g['idle_ms_per_step']:.2f} ms/step, of which "
                           f"{g['data_wait_ms_per_step']:.2f} ended by another stream's op")
    if out["runtime_api"]:
        out["summary"] += "; runtime calls (per step: n, ms, longest ms): " + ", ".join(
            f"{n} {c:g} {t:.2f} {m:.2f}" for n, c, t, m in out["runtime_api"][:6])
    return out


def runtime_calls(events: list[dict], steps: int, top: int = 10) -> list[list]:
    """CUDA runtime/driver calls of all threads by name: [name, calls per step, ms per step, longest
    ms], the costliest first (a cudaFree or cudaFreeHost waits for the whole device)."""
    calls: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("ph") != "X" or ev.get("cat") not in ("cuda_runtime", "cuda_driver"):
            continue
        c = calls.setdefault(ev.get("name", "?"), [0, 0.0, 0.0])
        dur = float(ev.get("dur", 0)) / 1e3
        c[0] += 1
        c[1] += dur
        c[2] = max(c[2], dur)
    ranked = sorted(calls.items(), key=lambda kv: -kv[1][1])[:top]
    return [[n, round(c / steps, 2), round(t / steps, 3), round(m, 3)] for n, (c, t, m) in ranked]


def training_gaps(streams: dict, train: str, steps: int, min_gap_us: float = 20.0, slack_us: float = 30.0) -> dict:
    """Idle time of the training stream between its first and last op, split by what ended it: a gap
    that closes within `slack_us` of an op ending on another stream (the loader's copy or kernel the
    step waited for through an event) is a data wait; the rest waited on the host (kernel launches,
    the throttle). Gaps shorter than `min_gap_us` (launch-to-launch spacing) are not counted."""
    spans = sorted(next(st for sid, st in streams.items() if str(sid) == train)["spans"])
    merged: list[list[float]] = []
    for a_, b_ in spans:
        if merged and a_ <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b_)
        else:
            merged.append([a_, b_])
    other_ends = sorted(b_ for sid, st in streams.items() if str(sid) != train for _, b_ in st["spans"])
    idle = data = 0.0
    count = 0
    for (_, end), (start, _) in zip(merged, merged[1:]):
        gap = start - end
        if gap < min_gap_us:
            continue
        idle += gap
        count += 1
        i = bisect.bisect_right(other_ends, start) - 1  # the last other-stream op ending before the gap closed
        if i >= 0 and other_ends[i] >= end and start - other_ends[i] <= slack_us:
            data += gap
    return {"idle_ms_per_step": idle / 1e3 / steps, "data_wait_ms_per_step": data / 1e3 / steps,
            "host_wait_ms_per_step": (idle - data) / 1e3 / steps, "gaps_per_step": count / steps}


@contextlib.contextmanager
def step_stream(device: torch.device, priority: str):
    """"high": a fresh CUDA stream of the device's highest priority is current for the block (so
    the GPU loaders' decode kernels, on their own streams, would only fill SMs the step leaves
    idle). Measured on an H200 (loaders-nvidia-h200-2026-11-28-stall-prio.json): no gain (dali 7.5 %
    vs 7.4 % at normal, the replayed device half 7.7 % vs 3.5 %), so the engine does not use it."""
    if priority not in ("normal", "side", "high"):
        raise ValueError(f"stream priority must be normal, side or high; got {priority!r}")
    if device.type != "cuda" or priority == "normal":  # torch's default stream: CUDA's legacy NULL stream
        yield None
        return
    outer = torch.cuda.current_stream(device)
    # "side": a non-blocking stream of default priority (no implicit sync with other blocking streams)
    from loaders.backends.encoded import cuda_priority

    stream = torch.cuda.Stream(device, priority=cuda_priority("high" if priority == "high" else "normal"))
    stream.wait_stream(outer)
    try:
        with torch.cuda.stream(stream):
            yield stream
    finally:
        outer.wait_stream(stream)


def timed_steps(step: Callable, batches: Iterator[tuple[torch.Tensor, int]], steps: int, warmup: int, device,
                priority: str = "normal", on_start: Callable[[], Any] | None = None) -> float:
    """img/s of `steps` training steps after `warmup`; the steps (and the batches' hand-over, which
    happens in next()) run on a CUDA stream of the given priority. on_start: called as the clock starts."""
    with step_stream(device, priority):
        for _ in range(warmup):
            step(next(batches)[0])
        sync(device)
        if on_start is not None:
            on_start()
        n, t0 = 0, time.perf_counter()
        for _ in range(steps):
            x, k = next(batches)
            step(x)
            n += k
        sync(device)
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench loaders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=",".join(ALL_BACKENDS), help="comma list of " + ", ".join(ALL_BACKENDS))
    p.add_argument("--sizes", default="256,512", help="JPEG edge lengths of the shards")
    p.add_argument("--workers", default="2", help="DataLoader workers (comma list: each backend runs at each)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--crop", type=int, default=224, help="output size of the random resized crop")
    p.add_argument("--seconds", type=float, default=6.0, help="measured time per backend and size")
    p.add_argument("--warmup", type=int, default=10, help="batches before the clock starts")
    p.add_argument("--images", type=int, default=None,
                   help="rows per shard set (default: 100000 at <=256 px, else 64000: epochs of ~3 s at the "
                        "GPU backends' rates; each row's epoch_boundary_ms says what a boundary costs)")
    p.add_argument("--distinct", type=int, default=128, help="distinct images among the rows")
    p.add_argument("--dali-threads", default="4",
                   help="DALI's CPU threads (besides the workers); a comma list sweeps them (every combination "
                        "of the dali lists runs as its own variant, in the throughput runs and --breakdown)")
    p.add_argument("--hw-decoder-load", default="1.0",
                   help="share of JPEGs for the hardware decoder; a comma list sweeps it")
    p.add_argument("--dali-no-copy", default="1",
                   help="1: DALI reads the fed images in place (no copy); a comma list ('0,1') sweeps both")
    p.add_argument("--dali-stage", default="0",
                   help="1: copy each batch's JPEGs into one pinned buffer before DALI reads them (DaliLoader "
                        "stage_inputs); a comma list ('0,1') sweeps both")
    p.add_argument("--dali-decode-crop", default="0",
                   help="1: DALI decodes only each sample's crop box (DaliLoader decode_crop; single-crop only); "
                        "a comma list ('0,1') sweeps both")
    p.add_argument("--dali-huffman", default="",
                   help="DALI's hybrid_huffman_threshold in pixels (DaliLoader; with --hw-decoder-load < 1, 0 decodes "
                        "the Huffman stage of the JPEGs the hardware decoder does not take on the GPU); empty: "
                        "DALI's default; a comma list sweeps it")
    p.add_argument("--dali-pipelines", default="1",
                   help="DALI pipelines fed in turn (DaliLoader pipelines; each with --dali-threads threads); a comma "
                        "list sweeps it")
    p.add_argument("--dali-queue", default="3",
                   help="DALI's prefetch_queue_depth (the loader's default: 3); a comma list sweeps it")
    p.add_argument("--dali-dynamic", default="",
                   help="DALI's execution model: 1 dynamic, 0 legacy (buffers allocated once); empty: DALI's default; "
                        "a comma list sweeps it")
    p.add_argument("--nvjpeg-ahead", default="0",
                   help="nvjpeg's decode_ahead (decode the next batch in its own thread while this one is cropped): "
                        "1 or 0; a comma list runs each as its own variant, in the throughput, breakdown and stall "
                        "runs (the engine stall uses the first)")
    p.add_argument("--repeats", type=int, default=1,
                   help="throughput rounds: every variant runs once per round, rounds one after another; "
                        "tables, ratios and the plot use each variant's median run (all runs stay in the JSON)")
    p.add_argument("--dali-streams", default="",
                   help="DALI's stream_policy (single, backend, operator); a comma list sweeps it (default: DALI's)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--data-dir", default=None,
                   help="where to build the shards (default: a temp dir, removed); kept when given, and a set an "
                        "earlier run left there with the same size, rows and distinct images is reused")
    p.add_argument("--stall", action="store_true", help="also measure the MAE training data stall per backend")
    p.add_argument("--multicrop", action="store_true",
                   help="DINOv2 multi-crop (2 x crop + 8 x 98 px, colour ops) instead of one crop; the PIL "
                        "baseline cuts them with torchvision v2 per crop. img/s counts source images")
    p.add_argument("--breakdown", action="store_true",
                   help="also measure the workers alone and each GPU backend's device half alone (what bounds it)")
    p.add_argument("--stall-engine", action="store_true",
                   help="also the stall of engine.run's own training loop (engine.train.Trainer: the MAE recipe of "
                        "--model, micro-batch --batch-size, --stall-accum per step, --compile; "
                        "--compile-mode if given, else "
                        "the engine's default, auto: CUDA graphs on one GPU) with each of "
                        "--stall-backends that the engine has (not pil) against data.shards=synthetic; dali and nvjpeg "
                        "run the first combination of their settings lists (as data.options)")
    p.add_argument("--stall-backends", default="dali,nvjpeg,cpu,pil")
    p.add_argument("--stall-steps", type=int, default=40)
    p.add_argument("--stall-accum", type=int, default=1,
                   help="--stall-engine: micro-batches of --batch-size per step (gradient accumulation, as the "
                        "recipes' global batches need on one GPU)")
    p.add_argument("--stall-replay", action="store_true",
                   help="also the stall of each GPU backend's device half alone (one batch decoded again and "
                        "again, no workers): tells decoding's cost to training from the workers' and the feed's")
    p.add_argument("--max-ahead", default="2",
                   help="GPU backends: batches of queued GPU work the training loop may run ahead (0: no limit); "
                        "a comma list repeats the stall runs for each")
    p.add_argument("--stall-size", type=int, default=256, help="JPEG size of the stall runs")
    p.add_argument("--stall-priority", default="normal",
                   help="stream of the stall runs' training steps: normal (torch's default stream), side (a new "
                        "non-blocking stream, default priority), high (the same at the highest priority) (a comma list "
                        "repeats each stall run, its synthetic baseline included, for each)")
    p.add_argument("--loader-priority", default="normal",
                   help="GPU backends: CUDA priority of the loader's prefetch stream in the stall runs, normal or "
                        "high (nvjpeg's crops and DALI's output copy; DALI 2.4 has no priority for its own streams); "
                        "a comma list repeats each run")
    p.add_argument("--stall-repeats", type=int, default=1,
                   help="alternate synthetic and real runs this many times per stall row; the row reports the "
                        "median stall and every pair (the card's rate drifts between runs)")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode of the stall model (reduce-overhead: CUDA graphs, no per-kernel launches)")
    p.add_argument("--stall-gil", default="",
                   help="Python's GIL switch interval (s) during the stall runs, e.g. 0.0005 (default: Python's "
                        "0.005); a comma list repeats each stall run for each")
    p.add_argument("--stall-profile", type=int, default=0,
                   help="after each stall run (and its synthetic baseline), profile this many more steps and "
                        "report GPU kernel time per step by CUDA stream (training vs loader) and the CUDA runtime "
                        "calls of all threads (count, ms, longest: which of them block)")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--compile", nargs="?", const="model", default=None, choices=["model", "blocks"],
                   help="torch.compile the stall model: the whole MAE model, as engine.run does on one GPU "
                        "(the default with a bare --compile), or only its encoder blocks")
    p.add_argument("--limit", type=float, default=240.0, help="seconds before a hung measurement aborts the run")
    p.add_argument("--tag", default=None, help="suffix of the result file names (runs of one day keep apart)")
    p.add_argument("--tiny", action="store_true", help="CPU-sized settings to check the script end to end")
    a = p.parse_args(argv)
    if a.tiny:
        a.sizes, a.batch_size, a.crop, a.seconds, a.warmup = "64", 8, 32, 1.0, 1
        a.images, a.distinct, a.stall_steps, a.stall_size = a.images or 64, 8, 1, 64
        a.model, a.dtype, a.limit = "vit_tiny_patch16_224", "float32", 120.0
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    from loaders import prepare_cuda

    prepare_cuda()  # what engine.run does: 32 CUDA hardware queues unless the environment chose (e.g. 8 for an A/B)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    sizes = [int(s) for s in a.sizes.split(",")]
    workers = [int(w) for w in a.workers.split(",")]
    for b in backends:
        if b not in ALL_BACKENDS:
            print(f"unknown backend {b!r}; valid: {', '.join(ALL_BACKENDS)}", file=sys.stderr)
            return 2
    data_root = Path(a.data_dir) if a.data_dir else Path(tempfile.mkdtemp(prefix="bench-loaders-"))
    data_root.mkdir(parents=True, exist_ok=True)
    cache_dir = str(data_root / "cache")
    cores = os.cpu_count() or 1
    options = {"dali": dali_options(a)[0], "nvjpeg": nvjpeg_options(a)[0]}
    payload: dict[str, Any] = {
        "config": {k: v for k, v in vars(a).items()} | {"device": str(device), "host_cores": cores},
        "shards": {}, "throughput": [], "breakdown": [], "stall": [], "engine_stall": [], "ratios": {}, "notes": [],
    }
    out_path: list[Path] = []

    def save() -> None:
        payload["ratios"] = ratios(payload["throughput"])
        tag = "-".join(t for t, on in (("multicrop", a.multicrop), ("breakdown", a.breakdown), (a.tag, a.tag))
                       if on) or None
        out_path[:] = [write_result("loaders", payload, argv, tag=tag)]

    def guarded(what: str, fn: Callable[[], dict]) -> dict:
        faulthandler.dump_traceback_later(a.limit, exit=True)  # a hung backend must not eat the GPU lease
        try:
            return fn()
        except Exception as e:
            print(f"[{what}] failed: {type(e).__name__}: {e}", file=sys.stderr)
            return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        finally:
            faulthandler.cancel_dump_traceback_later()
            gc.collect()

    try:
        for size in sorted(set(sizes) | ({a.stall_size} if a.stall or a.stall_engine else set())):
            # Enough rows that an epoch lasts ~3 s at 30k (256 px) / 20k (512 px) img/s (2.7 / 6.7 GB per set):
            # each boundary restarts the workers and drains the GPU decoder (the rows' epoch_boundary_ms),
            # which at the earlier 20k / 8k rows (an epoch every 0.4-0.7 s) held the rate well under the
            # steady state that a corpus of millions of images sees.
            rows = a.images or (100_000 if size <= 256 else 64_000)
            t = time.perf_counter()
            payload["shards"][str(size)] = build_shards(data_root, size, rows, a.distinct, min(cores, 16))
            payload["shards"][str(size)]["build_s"] = time.perf_counter() - t
        for rep, size, w, (backend, label, opts) in itertools.product(range(a.repeats), sizes, workers,
                                                                       variants(a, backends)):
            path = payload["shards"][str(size)]["path"]

            def run(backend=backend, w=w, path=path, opts=opts):
                loader = make_loader(backend, path, batch_size=a.batch_size, crop=a.crop, workers=w, device=device,
                                     dtype=dtype, cache_dir=cache_dir, options=opts, multicrop=a.multicrop)
                try:
                    return measure_throughput(loader, seconds=a.seconds, warmup=a.warmup, device=device)
                finally:
                    close(loader)

            t = time.perf_counter()
            row = {"backend": backend, "variant": label, "options": opts.get(backend, {}), "size": size, "workers": w,
                   "repeat": rep}
            row |= guarded(f"{label} {size}px", run)
            row["total_s"] = time.perf_counter() - t
            payload["throughput"].append(row)
            print(f"{label:>6} {size}px workers={w}: " + (f"{row['img_s']:,.0f} img/s, {row['cpu_cores']:.1f} cores"
                                                           if "img_s" in row else row["error"]), flush=True)
            if "decoder_ms" in row or "prefetch" in row:  # where the producer thread's time went
                split = {**row.get("decoder_ms", {}), **{k: v for k, v in row.get("prefetch", {}).items()
                                                         if k in ("wait_ms", "produce_ms", "full_ms")}}
                print("         ms/batch: " + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in split.items())
                      + (f"; epoch boundary +{row['epoch_boundary_ms']:.0f} ms ({row['epochs_started']} in the window)"
                         if "epoch_boundary_ms" in row else ""), flush=True)
            save()
        if a.breakdown:
            breakdown(a, payload, device, dtype, cache_dir, guarded, save, options)
        if a.stall:
            stall(a, payload, device, dtype, cache_dir, guarded, save, options)
        if a.stall_engine:
            engine_stall(a, payload, device, data_root, guarded, save)
    finally:
        if not a.data_dir:
            shutil.rmtree(data_root, ignore_errors=True)
    report(payload)
    save()
    plot(out_path[0], payload)
    return 0


def stall(a, payload, device, dtype, cache_dir, guarded, save, options) -> None:
    step_box: dict[str, Any] = {}

    def setup():
        from loaders.augment import AugmentSpec

        fixed = torch.randn(a.batch_size, 3, a.crop, a.crop, device=device).to(dtype)
        failures = []
        for kernels in ("auto", "torch") if device.type == "cuda" else ("torch",):
            try:  # the engine's Triton kernels first; SDPA if they fail here
                step, kind = build_train_step(a.model, a.crop, device, a.compile, kernels, a.compile_mode)
                step(fixed)
                break
            except Exception as e:
                failures.append(f"kernels={kernels}: {type(e).__name__}: {e}"[:500])
                step = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if step is None:
            raise RuntimeError("no MAE step could run: " + " | ".join(failures))
        step_box["step"] = step
        rate = timed_steps(step, itertools.repeat((fixed, fixed.shape[0])), a.stall_steps, max(1, a.warmup // 2),
                           device)
        return {"model": a.model, "step": kind, "synthetic_img_s": rate, "compile": a.compile,
                "compile_mode": a.compile_mode,
                "spec": str(AugmentSpec(size=a.crop)), "fallbacks": failures}

    base = guarded("stall setup", setup)
    payload["stall_model"] = base
    save()
    if "error" in base:
        return
    path = payload["shards"][str(a.stall_size)]["path"]
    w = int(a.workers.split(",")[0])
    gpu_backends = ("dali", "nvjpeg")
    fixed = torch.randn(a.batch_size, 3, a.crop, a.crop, device=device).to(dtype)
    priorities = [p.strip() for p in a.stall_priority.split(",") if p.strip()]
    gils = [float(x) for x in a.stall_gil.split(",") if x.strip()] or [None]
    runs = [(b.strip(), ahead, False) for b in a.stall_backends.split(",") if b.strip()
            for ahead in ([int(x) for x in a.max_ahead.split(",")] if b.strip() in gpu_backends else [None])]
    if a.stall_replay:  # the device half alone: one encoded batch decoded again and again, no workers
        runs += [(b, int(a.max_ahead.split(",")[0]), True) for b in gpu_backends if b in {r[0] for r in runs}]
    lprios = [p.strip() for p in a.loader_priority.split(",") if p.strip()]
    # each DALI settings combination and each nvjpeg setting gets its own stall rows
    settings = {"dali": dali_options(a), "nvjpeg": nvjpeg_options(a)}
    runs = [r + (prio, gil, lp, ci) for r in runs for prio in priorities for gil in gils
            for lp in (lprios if r[0] in gpu_backends else [None])
            for ci in range(len(settings.get(r[0], [None])))]
    for backend, ahead, replay, prio, gil, lprio, ci in runs:
        def run(backend=backend, ahead=ahead, replay=replay, prio=prio, gil=gil, lprio=lprio, ci=ci):
            opts = {k: dict(v) for k, v in options.items()}
            if backend in settings:
                opts[backend] = dict(settings[backend][ci])
            if ahead is not None:
                opts.setdefault(backend, {})["max_ahead"] = ahead
            if lprio is not None:
                opts.setdefault(backend, {})["stream_priority"] = lprio
            pairs, prof = [], {}
            loader = make_loader(backend, path, batch_size=a.batch_size, crop=a.crop,
                                 workers=0 if replay else w, device=device, dtype=dtype, cache_dir=cache_dir,
                                 options=opts)
            batches = replayed(loader, path, a, cache_dir, device) if replay else forever(loader)
            default_gil = sys.getswitchinterval()
            sys.setswitchinterval(gil or default_gil)  # restored below, whatever happens
            try:
                for _ in range(max(1, a.stall_repeats)):
                    # the synthetic rate right before each real run: the stall is a ratio of two runs minutes
                    # apart otherwise, and the card's clocks drift by a few percent
                    fixed_batches = itertools.repeat((fixed, fixed.shape[0]))
                    synthetic = timed_steps(step_box["step"], fixed_batches, a.stall_steps, max(1, a.warmup // 2),
                                            device, prio)
                    if a.stall_profile and not prof:
                        prof["synthetic"] = profile_steps(step_box["step"], fixed_batches, a.stall_profile, device)
                    meter = getattr(loader, "meter", None)  # the GPU backends' prefetch waits
                    box = {}
                    cpu0, t0 = cpu_seconds(), time.perf_counter()
                    rate = timed_steps(step_box["step"], batches, a.stall_steps, max(1, a.warmup // 2), device, prio,
                                       on_start=lambda: box.update(m0=meter.snapshot()) if meter else None)
                    cores = (cpu_seconds() - cpu0) / (time.perf_counter() - t0)
                    pairs.append({"real_img_s": rate, "synthetic_img_s": synthetic, "stall": 1 - rate / synthetic,
                                  "cpu_cores": cores})
                    if meter is not None:
                        pairs[-1]["prefetch"] = type(meter).per_item(box["m0"], meter.snapshot())
                    if a.stall_profile and "real" not in prof:
                        prof["real"] = profile_steps(step_box["step"], batches, a.stall_profile, device)
            finally:
                batches.close()
                close(loader)
                sys.setswitchinterval(default_gil)
            out = dict(lower_median(pairs, "stall"))  # the median pair
            if len(pairs) > 1:
                out["pairs"] = pairs
                out["stall_range"] = [min(r["stall"] for r in pairs), max(r["stall"] for r in pairs)]
            return out | ({"profile": prof} if prof else {})

        row = {"backend": backend + (" replay" if replay else ""), "size": a.stall_size, "workers": 0 if replay else w,
               "max_ahead": ahead, "priority": prio, "gil_interval_s": gil, "loader_priority": lprio}
        if backend in settings:
            row["options"] = settings[backend][ci]
        row |= guarded(f"stall {row['backend']}", run)
        payload["stall"].append(row)
        label = (row["backend"] if ahead is None else f"{row['backend']} max_ahead={ahead}") + f" {prio}" + \
            (f" gil={gil}" if gil else "") + (f" loader={lprio}" if lprio else "") + \
            (f" exec_dynamic={row['options']['exec_dynamic']}" if "exec_dynamic" in row.get("options", {}) else "") + \
            (f" decode_ahead={row['options']['decode_ahead']}"
             if len(settings["nvjpeg"]) > 1 and backend == "nvjpeg" else "")
        for pair in row.get("pairs", [row]):
            if "prefetch" in pair:
                m = pair["prefetch"]
                print(f"  prefetch per batch: waited {m['wait_ms']:.2f} ms for data, {m['throttle_ms']:.2f} ms in "
                      f"max_ahead, {m['pending_share']:.0%} handed over still decoding; producer {m['produce_ms']:.2f} "
                      f"ms making, {m['full_ms']:.2f} ms ahead (stall {pair['stall']:.1%})", flush=True)
        if "profile" in row:
            for kind, pr in row["profile"].items():
                print(f"  profile {kind}: " + pr.get("summary", pr.get("error", "")), flush=True)
        print(f"stall {label:>6}: " + (f"{row['real_img_s']:,.0f} img/s real vs {row['synthetic_img_s']:,.0f} "
                                       f"synthetic, stall {row['stall']:.1%}" + (
                                           " (median; range {:.1%} to {:.1%})".format(*row["stall_range"])
                                           if "stall_range" in row else "") if "stall" in row else row["error"]),
              flush=True)
        save()


def engine_intervals(a) -> tuple[int, int]:
    """(steps per logged interval, intervals dropped as warm-up) of the engine stall runs: a
    quarter of --stall-steps per interval, four of them measured after --warmup steps."""
    every = max(1, a.stall_steps // 4)
    return every, -(-max(1, a.warmup) // every)


def engine_options(a, device: torch.device, run_dir: Path, shards: str, backend: str | None) -> list[str]:
    """engine.run overrides for the engine stall runs: the MAE recipe of --model at --crop,
    --stall-accum micro-batches of --batch-size per step, logged per engine_intervals()."""
    every, warm = engine_intervals(a)
    out = [f"model.name={a.model}", f"model.img_size={a.crop}", f"model.patch_size={stall_patch(a.crop)}",
           f"train.batch_size={a.batch_size * a.stall_accum}", f"train.micro_batch={a.batch_size}",
           f"train.device={device.type}",
           f"train.steps={every * (warm + 4)}", f"log.every_steps={every}", "log.progress=false",
           "log.tensorboard=false", f"checkpoint.every_steps={every * (warm + 4) + 1}", "optim.warmup_steps=1",
           f"run.dir={run_dir}", f"model.compile={'true' if a.compile else 'false'}",
           "train.precision=auto", "model.kernels=auto", "eval.data=null"]
    if a.compile and a.compile_mode:
        out.append(f"model.compile_mode={a.compile_mode}")
    if backend is None:
        out.append("data.shards=synthetic")
    else:
        out += [f"data.shards={shards}", f"data.backend={backend}", f"data.workers={int(a.workers.split(',')[0])}",
                f"data.cache_dir={run_dir.parent / 'engine-cache'}"]
        if backend == "nvjpeg":
            out.append(f"data.options={{nvjpeg: {{decode_ahead: "
                       f"{str(nvjpeg_options(a)[0]['decode_ahead']).lower()}}}}}")
        if backend == "dali":
            extra = dali_engine_options(dali_options(a)[0])
            if extra:
                out.append("data.options={dali: {" + ", ".join(f"{k}: {v}" for k, v in extra.items()) + "}}")
    return out


def dali_engine_options(options: dict[str, Any]) -> dict[str, str]:
    """The dali settings of a bench run that differ from DaliLoader's defaults, as YAML scalars for engine.run's
    data.options (the engine stall runs the first settings combination)."""
    from loaders.backends.dali import DaliLoader, default_threads

    defaults = {k: p.default for k, p in inspect.signature(DaliLoader.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    defaults["dali_threads"] = default_threads()  # what None means in DaliLoader
    out = {}
    for k, v in options.items():
        if k in defaults and v != defaults[k]:
            out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def engine_rate(rows: list[dict], every: int, batch: int, skip: int) -> tuple[float, float]:
    """(img/s, data wait ms per step) over the logged intervals after the first `skip` (each interval
    holds the same images, so img/s is their harmonic mean)."""
    kept = [r for r in rows if "img_per_s" in r][skip:]
    if not kept:
        raise RuntimeError("the engine run logged no interval after its warm-up")
    seconds = sum(every * batch / r["img_per_s"] for r in kept)
    return len(kept) * every * batch / seconds, sum(r.get("data_wait_ms", 0.0) for r in kept) / len(kept)


def engine_stall(a, payload, device, data_root: Path, guarded, save) -> None:
    """The data stall of engine.run's training loop itself: a synthetic run, then one per backend."""
    from engine.config import load_config
    from engine.train import Trainer

    recipe = Path(__file__).resolve().parents[1] / "recipes" / (
        "vit_b_mae.yaml" if a.model == "vit_base_patch16_224" else "quickstart.yaml")
    path = payload["shards"][str(a.stall_size)]["path"]
    every, skip = engine_intervals(a)
    backends = [b.strip() for b in a.stall_backends.split(",") if b.strip() and b.strip() != "pil"]
    synthetic: dict[str, float] = {}
    for backend in [None] + backends:
        def run(backend=backend):
            run_dir = data_root / f"engine-{backend or 'synthetic'}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = load_config(recipe, engine_options(a, device, run_dir, path, backend))
            with open(os.devnull, "w") as quiet:
                trainer = Trainer(cfg, run_dir, out=quiet)
                trainer.fit()
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            rate, wait = engine_rate(rows, every, a.batch_size * a.stall_accum, skip)
            out = {"img_s": rate, "data_wait_ms": wait, "compile_mode": trainer.compile_mode}  # as resolved
            if backend is not None and "img_s" in synthetic:
                out["stall"] = 1 - rate / synthetic["img_s"]
            return out

        row = {"backend": backend or "synthetic", "size": a.stall_size, "recipe": recipe.name, "accum": a.stall_accum,
               "compile": a.compile, "compile_mode": a.compile_mode} | guarded(f"engine stall {backend}", run)
        if backend is None:
            synthetic.update(row)
        payload["engine_stall"].append(row)
        print(f"engine stall {row['backend']:>9}: " + (
            f"{row['img_s']:,.0f} img/s, data wait {row['data_wait_ms']:.2f} ms/step"
            + (f", stall {row['stall']:.1%}" if "stall" in row else "") if "img_s" in row else row["error"]),
            flush=True)
        save()


def encoded_batches(a, path: str, cache_dir: str, workers: int):
    """The GPU backends' worker half alone: a DataLoader of encoded batches (bytes or shard
    offsets, crops) over the shards at `path`, without a decoder behind it."""
    from loaders import AugmentSpec
    from loaders.backends.encoded import encoded_dataloader, make_encoded_dataset
    from loaders.loader import as_stream_specs

    ds = make_encoded_dataset(as_stream_specs(path), batch_size=a.batch_size, shuffle=True, seed=0,
                              cache_dir=cache_dir, num_canonical_nodes=None, augment=AugmentSpec(size=a.crop),
                              decode_png=False)
    return encoded_dataloader(ds, batch_size=a.batch_size, num_workers=workers)


def replayed(loader, path: str, a, cache_dir: str, device) -> Iterator[tuple[torch.Tensor, int]]:
    """The loader's device half fed one encoded batch (read once by a worker-less dataloader) again
    and again through the loader's own prefetch thread: the stall of decoding alone."""
    from loaders.backends.encoded import as_torch, prefetch, shutdown_workers

    dl = encoded_batches(a, path, cache_dir, workers=0)
    raw = as_torch(next(iter(dl)))
    shutdown_workers(dl)
    for batch, _ in prefetch(lambda: loader._produce(itertools.repeat(raw)), loader.device, loader.prefetch_batches,
                             loader.max_ahead, loader.stream_priority, loader.meter):
        yield images_of(batch), source_images(batch)


def dali_options(a) -> list[dict[str, Any]]:
    """The dali backend's settings: every combination of the comma lists (the first is the default)."""
    dynamic = [bool(int(x)) for x in a.dali_dynamic.split(",") if x.strip()] or [None]
    streams = [x.strip() for x in a.dali_streams.split(",") if x.strip()] or [None]
    huffman = [int(x) for x in a.dali_huffman.split(",") if x.strip()] or [None]
    return [{"dali_threads": int(t), "hw_decoder_load": float(h), "no_copy": bool(int(c)),
             "prefetch_queue_depth": int(q)}
            | ({} if d is None else {"exec_dynamic": d}) | ({} if sp is None else {"stream_policy": sp})
            | ({"stage_inputs": True} if int(st) else {}) | ({"decode_crop": True} if int(dc) else {})
            | ({} if hu is None else {"hybrid_huffman_threshold": hu})
            | ({} if int(pl) == 1 else {"pipelines": int(pl)})
            for t, h, c, q, d, sp, st, dc, hu, pl in itertools.product(
                a.dali_threads.split(","), a.hw_decoder_load.split(","), a.dali_no_copy.split(","),
                a.dali_queue.split(","), dynamic, streams, a.dali_stage.split(","), a.dali_decode_crop.split(","),
                huffman, a.dali_pipelines.split(","))]


def nvjpeg_options(a) -> list[dict[str, Any]]:
    """The nvjpeg backend's settings, one per value of --nvjpeg-ahead (the first is the default)."""
    return [{"decode_ahead": bool(int(x))} for x in a.nvjpeg_ahead.split(",") if x.strip()] or [{"decode_ahead": False}]


def variants(a, backends: list[str]) -> list[tuple[str, str, dict[str, dict]]]:
    """(backend, label, options) per run: one per backend, the dali one per settings combination
    (labelled with its settings when there are several)."""
    out = []
    for backend in backends:
        if backend == "nvjpeg":
            combos = nvjpeg_options(a)
            out += [(backend,
                     "nvjpeg" if len(combos) == 1 else "nvjpeg ahead" if o["decode_ahead"] else "nvjpeg inline",
                     {"nvjpeg": o}) for o in combos]
            continue
        if backend != "dali":
            out.append((backend, backend, {}))
            continue
        combos = dali_options(a)
        for o in combos:
            label = "dali" if len(combos) == 1 else (
                f"dali t{o['dali_threads']} hw{o['hw_decoder_load']:g} {'nocopy' if o['no_copy'] else 'copy'} "
                f"q{o['prefetch_queue_depth']}" + ("" if "exec_dynamic" not in o else
                                                   " dynamic" if o["exec_dynamic"] else " legacy")
                + (f" streams={o['stream_policy']}" if "stream_policy" in o else "")
                + (" staged" if o.get("stage_inputs") else "") + (" decode-crop" if o.get("decode_crop") else "")
                + (f" huff{o['hybrid_huffman_threshold']}" if "hybrid_huffman_threshold" in o else "")
                + (f" p{o['pipelines']}" if "pipelines" in o else ""))
            out.append((backend, label, {"dali": o}))
    return out


def breakdown(a, payload, device, dtype, cache_dir, guarded, save, options) -> None:
    """What bounds the GPU-decoding backends, measured apart: (1) the DataLoader workers alone
    (read the MDS rows, parse headers, draw crops, hand encoded batches to the main process),
    (2) each backend's device half alone (decode + crop/resize + normalize) on one encoded batch
    fed again and again from memory in the main thread, no workers running."""
    from loaders.backends.encoded import as_torch, shutdown_workers

    w = int(a.workers.split(",")[0])
    for size in [int(s) for s in a.sizes.split(",")]:
        path = payload["shards"][str(size)]["path"]
        box: dict[str, Any] = {}

        def workers_only():
            dl = encoded_batches(a, path, cache_dir, workers=w)
            try:
                it = iter(dl)
                for _ in range(a.warmup):
                    box["raw"] = as_torch(next(it))
                n, cpu0, t0 = 0, cpu_seconds(), time.perf_counter()
                while time.perf_counter() - t0 < a.seconds:
                    try:
                        n += len(next(it)["uid"])
                    except StopIteration:
                        it = iter(dl)
                wall = time.perf_counter() - t0
                return {"img_s": n / wall, "cpu_cores": (cpu_seconds() - cpu0) / wall}
            finally:
                shutdown_workers(dl)
                del dl

        row = {"part": "workers (read + parse + crop draw, encoded batches)", "size": size, "workers": w}
        row |= guarded(f"breakdown workers {size}px", workers_only)
        payload["breakdown"].append(row)
        print(f"breakdown {size}px workers only ({w}): " + (f"{row['img_s']:,.0f} img/s, {row['cpu_cores']:.1f} cores"
                                                          if "img_s" in row else row["error"]), flush=True)
        variants = ([("dali", {"dali": o}) for o in dali_options(a)]
                    + [("nvjpeg", {"nvjpeg": o}) for o in nvjpeg_options(a)])
        for backend, opts in variants:
            if "raw" not in box or backend not in a.backends:
                continue

            def device_only(backend=backend, opts=opts):
                loader = make_loader(backend, path, batch_size=a.batch_size, crop=a.crop, workers=0, device=device,
                                     dtype=dtype, cache_dir=cache_dir, options=opts)
                gen = loader._produce(itertools.repeat(box["raw"]))
                try:
                    for _ in range(a.warmup):
                        next(gen)
                    sync(device)
                    n, cpu0, t0 = 0, cpu_seconds(), time.perf_counter()
                    with GPUBusy(device) as busy:
                        while time.perf_counter() - t0 < a.seconds:
                            (batch, _), _ = next(gen)
                            n += len(batch)
                        sync(device)
                        wall = time.perf_counter() - t0
                    return {"img_s": n / wall, "cpu_cores": (cpu_seconds() - cpu0) / wall, "gpu_busy": busy.mean}
                finally:
                    gen.close()
                    close(loader)

            row = {"part": f"{backend} device half (decode + crop/resize + normalize), from memory", "size": size,
                   "options": opts.get(backend, {})}
            row |= guarded(f"breakdown {backend} {size}px", device_only)
            payload["breakdown"].append(row)
            print(f"breakdown {size}px {backend} {row['options']} device half: " + (
                f"{row['img_s']:,.0f} img/s, {row['cpu_cores']:.1f} cores" if "img_s" in row else row["error"]),
                flush=True)
        save()


def lower_median(rows: list[dict], key: str) -> dict:
    """The row with the median `key` (the lower middle one of an even count): a run that happened,
    not an average of two."""
    return sorted(rows, key=lambda r: r[key])[(len(rows) - 1) // 2]


def medians(rows: list[dict]) -> list[dict]:
    """One row per (variant, size, workers): the run with the median img/s over the repeats (the
    lower middle one of an even count), with every run's img/s under `runs`. Failed runs count
    only when no run of that variant succeeded."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("variant", r["backend"]), r["size"], r["workers"]), []).append(r)
    out = []
    for group in groups.values():
        ok = [r for r in group if "img_s" in r]
        out.append(lower_median(ok, "img_s") | {"runs": [r["img_s"] for r in ok]} if ok else group[0])
    return out


def ratios(rows: list[dict]) -> dict[str, float]:
    """Each backend's img/s over the PIL baseline's at the same size and worker count (medians over
    the repeats)."""
    rows = medians(rows)
    base = {(r["size"], r["workers"]): r["img_s"] for r in rows if r["backend"] == BASELINE and "img_s" in r}
    out = {}
    for r in rows:
        if r["backend"] != BASELINE and "img_s" in r and base.get((r["size"], r["workers"])):
            out[f"{r.get('variant', r['backend'])}/{BASELINE} {r['size']}px w{r['workers']}"] = \
                r["img_s"] / base[(r["size"], r["workers"])]
    return out


def report(payload: dict) -> None:
    print(f"\nloaders on {card_name()} (batch {payload['config']['batch_size']}, crop {payload['config']['crop']})")
    rows = [{"backend": r.get("variant", r["backend"]), "size": r["size"], "workers": r["workers"],
             "img/s": r.get("img_s", float("nan")),
             "runs": " ".join(f"{x / 1e3:.1f}k" for x in r.get("runs", [])) if len(r.get("runs", [])) > 1 else "-",
             "cores": r.get("cpu_cores", float("nan")),
             "gpu busy": r.get("gpu_busy") if r.get("gpu_busy") is not None else "-",
             "error": (r.get("error") or "")[:60]} for r in medians(payload["throughput"])]
    print_table(rows, ["backend", "size", "workers", "img/s", "runs", "cores", "gpu busy", "error"])
    for k, v in payload["ratios"].items():
        print(f"  {k}: {v:.2f}x")
    if payload["stall"]:
        print(f"\nMAE stall ({payload.get('stall_model', {}).get('step')}):")
        print_table([{"backend": r["backend"], "max ahead": "-" if r.get("max_ahead") is None else r["max_ahead"],
                      "priority": r.get("priority", "normal"), "gil": r.get("gil_interval_s") or "-",
                      "real img/s": r.get("real_img_s", float("nan")),
                      "synthetic img/s": r.get("synthetic_img_s", float("nan")),
                      "stall": r.get("stall", float("nan")), "cores": r.get("cpu_cores", float("nan")),
                      "error": (r.get("error") or "")[:60]} for r in payload["stall"]],
                    ["backend", "max ahead", "priority", "gil", "real img/s", "synthetic img/s", "stall", "cores",
                     "error"])
    if payload.get("engine_stall"):
        print("\nengine.run's own loop (engine.train.Trainer):")
        print_table([{"data": r["backend"], "img/s": r.get("img_s", float("nan")),
                      "data wait ms/step": r.get("data_wait_ms", float("nan")),
                      "stall": r.get("stall", "-"), "error": (r.get("error") or "")[:60]}
                     for r in payload["engine_stall"]], ["data", "img/s", "data wait ms/step", "stall", "error"])


def plot(json_path: Path, payload: dict) -> None:
    rows = [r for r in medians(payload["throughput"]) if "img_s" in r]
    labels = sorted({f"{r['size']}px w{r['workers']}" for r in rows})
    series: dict[str, list[float]] = {}
    for r in rows:
        series.setdefault(r.get("variant", r["backend"]),
                          [0.0] * len(labels))[labels.index(f"{r['size']}px w{r['workers']}")] = r["img_s"]
    if series:
        bar_plot(json_path.with_suffix(".png"), labels, series, "images/s to the device",
                 f"loader throughput on {card_name()}")


if __name__ == "__main__":
    sys.exit(main())
