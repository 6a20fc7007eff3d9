"""What the GPU-decoding backends (`nvjpeg`, `dali`) share: DataLoader workers that read
*encoded* images from the MDS shards without decoding them, plus the per-sample crop drawn
from the same RNG as the `cpu` backend, and a prefetch thread that prepares the next
batch on a side CUDA stream while the training step runs.

Workers only parse the image header (dimensions, channels, not truncated) so a crop can
be drawn and garbage rejected early; the decode happens in one batched call on the device.
From local shards a worker sends each image's place in its shard file, not its bytes, and the
main process reads the image in place through its own memory map (`ShardMaps`); with every
shard local, the sample ids come straight from streaming's partition (`EncodedDataset.__iter__`).
At ~35 us of worker time per image (H200 host), two workers feed 50k images/s.
"""
from __future__ import annotations

import collections
import dataclasses
import mmap
import multiprocessing
import os
import queue
import struct
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from loaders.augment import AugmentSpec, sample_crop
from loaders.backends.barrier import fast_epoch_barrier
from loaders.backends.cpu import decode, make_dataset, sample_generator
from loaders.loader import Batch, Loader

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOF markers carrying the frame size (all but DHT=C4, JPG=C8, DAC=CC).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_SOF_FIELDS = struct.Struct(">BHHB")  # precision, height, width, components
_PNG_FIELDS = struct.Struct(">IIBB")  # IHDR: width, height, bit depth, colour type


class ImageHeaderError(ValueError):
    """The bytes are not a complete JPEG or PNG."""


def probe_image(data, begin: int = 0, end: int | None = None) -> tuple[str, int, int, int]:
    """(kind, height, width, channels) of the JPEG/PNG in data[begin:end], from the header alone.

    `data` is bytes or a memory-mapped shard (read in place: only the header's bytes are
    touched). Raises ImageHeaderError for anything else, and for a JPEG without an
    end-of-image marker after its scan (truncated files: GPU decoders may not notice those).
    """
    n = len(data) if end is None else end
    if n - begin >= 4 and data[begin] == 0xFF and data[begin + 1] == 0xD8:
        pos, size = begin + 2, None
        while pos + 4 <= n:
            if data[pos] != 0xFF:
                raise ImageHeaderError(f"bad JPEG marker at byte {pos - begin}")
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
                pos += 2
                continue
            length = (data[pos + 2] << 8) | data[pos + 3]
            if marker in _SOF:
                if pos + 10 > n:
                    break
                _, h, w, c = _SOF_FIELDS.unpack_from(data, pos + 4)
                size = (h, w, c)
            elif marker == 0xDA:  # start of scan: the entropy-coded data follows
                if size is None:
                    raise ImageHeaderError("JPEG scan before frame header")
                # the end-of-image marker closes the file (it may be followed by padding)
                if not (data[n - 2] == 0xFF and data[n - 1] == 0xD9) and data.rfind(b"\xff\xd9", pos, n) < 0:
                    raise ImageHeaderError("JPEG is truncated (no end-of-image marker)")
                h, w, c = size
                if h == 0 or w == 0 or c not in (1, 3, 4):
                    raise ImageHeaderError(f"unsupported JPEG frame {h}x{w}x{c}")
                return "jpeg", h, w, (1 if c == 1 else 3)
            pos += 2 + length
        raise ImageHeaderError("JPEG header is incomplete")
    if n - begin >= 26 and data[begin:begin + 8] == PNG_SIGNATURE and data[begin + 12:begin + 16] == b"IHDR":
        w, h, depth, ctype = _PNG_FIELDS.unpack_from(data, begin + 16)
        if h == 0 or w == 0:
            raise ImageHeaderError("empty PNG")
        return "png", h, w, (1 if ctype in (0, 4) else 3)
    raise ImageHeaderError(f"not a JPEG or PNG (starts with {bytes(data[begin:min(n, begin + 8)])!r})")


class FastMDSReader:
    """Reads the image/modality/source/uid columns of one local, uncompressed MDS shard
    through a memory map (the MDS layout: a uint32 offset table, then per sample a uint32
    size for each variable-size column followed by the column values in order)."""

    WANTED = ("image", "modality", "source", "uid")

    def __init__(self, shard):
        if type(shard).__name__ != "MDSReader" or getattr(shard, "compression", None):
            raise NotImplementedError("fast path: uncompressed MDS only")
        with open(shard_path(shard), "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.names = list(shard.column_names)
        self.sizes = list(shard.column_sizes)  # None for variable size
        encodings = dict(zip(self.names, shard.column_encodings))
        for name in self.WANTED:
            if encodings.get(name) != ("bytes" if name == "image" else "str"):
                raise NotImplementedError(f"fast path: unexpected encoding for {name}")
        self.n_var = sum(1 for s in self.sizes if not s)

    def get(self, rel: int, image_bytes: bool = True) -> dict[str, Any]:
        """The wanted columns of row `rel`; with image_bytes=False the image stays in the map
        and `image_at` gives its (offset, size) in the shard file instead."""
        mm = self.mm
        begin, end = struct.unpack_from("<II", mm, (1 + rel) * 4)
        var = struct.unpack_from(f"<{self.n_var}I", mm, begin)
        pos, k, out = begin + 4 * self.n_var, 0, {}
        for name, size in zip(self.names, self.sizes):
            if not size:
                size = var[k]
                k += 1
            if name == "image":
                if image_bytes:
                    out[name] = mm[pos : pos + size]
                else:
                    out["image_at"] = (pos, size)
            elif name in self.WANTED:
                out[name] = mm[pos : pos + size].decode("utf-8")
            pos += size
        if pos != end:
            raise ValueError(f"MDS sample {rel} has {end - begin} bytes, columns account for {pos - begin}")
        return out


def shard_path(shard) -> str:
    """The local file of an MDS shard reader."""
    return os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename)


def default_map_limit() -> int:
    """Open shard maps per process: a quarter of the open-file limit (256 under the usual 1,024),
    at most 1,024. streaming's shuffle draws a block's samples from ~100+ shards at once, so a
    much smaller set would reopen maps all the time."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 4096
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        soft = 1024
    return max(16, min(1024, soft // 4))


class OpenMaps(collections.OrderedDict):
    """The most recently used memory maps of shard files, at most `limit` of them. A map holds a
    file descriptor, and a corpus has thousands of shards: unbounded, a long run would reach the
    usual 1,024 open-file limit. A map dropped here stays valid while a view of it is alive."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.limit = limit or default_map_limit()

    def lookup(self, key: int):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def keep(self, key: int, value):
        self[key] = value
        while len(self) > self.limit:
            self.popitem(last=False)
        return value


class ShardMaps:
    """The main process's memory maps of local shard files: a worker sends (shard, offset,
    size) for each image instead of its bytes, and the decoder reads the image where the
    page cache already holds it (no copy into a per-batch shared-memory buffer, whose fresh
    pages cost more than the copy itself). Maps are private copy-on-write, so the numpy views
    are writable (torch takes them without a warning) and never written."""

    def __init__(self, dataset, limit: int | None = None):
        self.dataset = dataset
        self.maps = OpenMaps(limit)

    def view(self, shard_id: int) -> np.ndarray:
        arr = self.maps.lookup(shard_id)
        if arr is None:
            with open(shard_path(self.dataset.shards[shard_id]), "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            arr = self.maps.keep(shard_id, np.frombuffer(mm, dtype=np.uint8))
        return arr


def _make_dataset_class():
    from streaming import StreamingDataset

    class EncodedDataset(StreamingDataset):
        """StreamingDataset whose items are the encoded bytes plus the sample's crop.

        `decode_png`: PNG samples are decoded here (the `nvjpeg` path decodes only JPEG);
        `dali` leaves them encoded (its decoder reads PNG).
        """

        def __init__(self, *, augment: AugmentSpec, aug_seed: int, decode_png: bool, **kwargs: Any):
            super().__init__(**kwargs)
            from loaders.multicrop import MultiCropSpec

            if not isinstance(augment, (AugmentSpec, MultiCropSpec)):
                raise TypeError(f"this backend implements AugmentSpec and MultiCropSpec, got {type(augment).__name__}")
            self.augment = augment
            self.aug_seed = aug_seed
            # The epoch of the crop RNG lives in shared memory, so persistent workers see the
            # loader's new epoch without being forked again.
            self._aug_epoch = multiprocessing.Value("q", 0, lock=False)
            self.decode_png = decode_png
            self._fast_readers = OpenMaps()  # shard id -> FastMDSReader, most recently used
            self._zero_copy: dict[int, bool] = {}

        @property
        def aug_epoch(self) -> int:
            return int(self._aug_epoch.value)

        @aug_epoch.setter
        def aug_epoch(self, epoch: int) -> None:
            self._aug_epoch.value = int(epoch)

        def all_local(self) -> bool:
            """Every shard is on local disk and none can be evicted (nothing to download)."""
            from streaming.base.dataset import _ShardState

            return not self.cache_limit and bool((self._shard_states.numpy() == _ShardState.LOCAL).all())

        def __iter__(self) -> Iterator[dict[str, Any]]:
            """This worker's samples of the epoch. With every shard local, the sample ids come
            straight from streaming's partition (the same `_resume_incr_epoch` / `_get_work` calls
            and order as streaming's own __iter__), without its download and ready threads: those
            walk every sample id again in Python beside this loop (three per-sample loops under one
            GIL) and sleep in 7 ms ticks when the yield loop catches up; at tens of thousands of
            images/s they cost about half of a worker's time. Anything to download: streaming's."""
            fast_epoch_barrier(self)
            if not self.all_local():
                yield from super().__iter__()
                return
            if hasattr(self, "_iterator"):
                self._iterator.exit()  # a previous epoch's threads, if any
            self._unique_worker_world = self._unique_rank_world.detect_workers()
            self._parallel_worker_world = self._parallel_rank_world.detect_workers()
            epoch, sample_in_epoch = self._resume_incr_epoch()
            for idx in self._get_work(epoch, sample_in_epoch).tolist():
                if idx != -1:  # padding of uneven partitions
                    yield self.get_item(idx)

        def reader(self, shard_id: int) -> FastMDSReader | None:
            """The memory-mapped reader of a local uncompressed MDS shard (None otherwise:
            not downloaded yet, or another format; streaming's own get_item reads those)."""
            reader = self._fast_readers.lookup(shard_id)
            if reader is None:
                try:
                    reader = self._fast_readers.keep(shard_id, FastMDSReader(self.shards[shard_id]))
                except (FileNotFoundError, NotImplementedError):
                    return None
            return reader

        def zero_copy(self, shard_id: int) -> bool:
            """Whether the main process may read this shard's images from the file itself: a
            local stream, or a remote one whose cache never evicts (no cache_limit)."""
            ok = self._zero_copy.get(shard_id)
            if ok is None:
                stream = self.streams[int(self.stream_per_shard[shard_id])]
                ok = self._zero_copy[shard_id] = stream.remote is None or not self.cache_limit
            return ok

        def get_item(self, idx: int, retry: int = 7) -> dict[str, Any]:
            """The encoded image (or its place in a local shard, see ShardMaps) with the tags,
            its size from the header and its crops. Local uncompressed MDS shards are read
            through a memory map, decoding only the columns needed (streaming's get_item opens
            the shard file and decodes every column per sample: the workers' main cost at 30k
            img/s)."""
            shard_id, rel = self.spanner[idx]
            reader = self.reader(shard_id)
            if reader is None:
                row = super().get_item(idx, retry)
                data, begin, end = row["image"], 0, None
            else:
                if self.cache_limit:  # what streaming's eviction reads
                    self._shard_access_times[shard_id] = time.time_ns()
                row = reader.get(rel, image_bytes=False)
                begin, size = row["image_at"]
                data, end = reader.mm, begin + size
            out = {"modality": row["modality"], "source": row["source"], "uid": row["uid"]}
            try:
                kind, h, w, _ = probe_image(data, begin, end)
                gen = sample_generator(self.aug_seed, self.aug_epoch, idx)
                # every crop's box, then (multi-crop) the photometric parameters: the cpu backend's order
                out["crop"] = [sample_crop(h, w, spec, gen) for spec in self.augment.crop_specs()]
                if not isinstance(self.augment, AugmentSpec):
                    out["params"] = self.augment.draw_params(gen)
                if kind == "png" and self.decode_png:
                    out["pixels"] = decode(data[begin:end])
                elif reader is None:
                    out["data"] = data
                else:
                    out["data"] = memoryview(data)[begin:end]  # copied only if the batch is
                    if self.zero_copy(shard_id):
                        out["loc"] = (shard_id, begin, size)
                out["shape"] = (h, w)
            except Exception as e:  # skipped and counted by the loader, never substituted
                out["error"] = f"{type(e).__name__}: {e}"
            return out

    return EncodedDataset


def _byte_buffer(parts: list[bytes]) -> torch.Tensor:
    """All parts in one uint8 tensor, written once: straight into shared memory inside a
    DataLoader worker (as torch's default_collate does), so the batch crosses to the
    main process without another copy."""
    total = sum(len(p) for p in parts)
    out = None
    if torch.utils.data.get_worker_info() is not None:
        try:
            elem = torch.empty(0, dtype=torch.uint8)
            out = elem.new(elem._typed_storage()._new_shared(total, device="cpu")).resize_(total)
        except Exception:  # private API moved: fall back to a plain tensor
            out = None
    if out is None:
        out = torch.empty(total, dtype=torch.uint8)
    view, pos = out.numpy(), 0
    for p in parts:
        view[pos : pos + len(p)] = np.frombuffer(p, dtype=np.uint8)
        pos += len(p)
    return out


def collate_encoded(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of encoded images: their places in the shard files (`locs` [n, 3] = shard,
    offset, size) when every one has one, else one flat uint8 tensor of all their bytes (one
    shared-memory buffer per batch, not one per image) with their lengths; decoded PNGs ride
    along as tensors, at the positions listed in `decoded_at`. Sample order is the dataset's.

    The small arrays (crops, shapes, locs, params) are numpy: they are pickled inline to the
    main process, where a tensor would cost a shared-memory segment and a file-descriptor
    round trip to the worker each; `as_torch` turns them into tensors there."""
    good = [r for r in rows if "error" not in r]
    encoded = [r for r in good if "data" in r]
    multi = [r["params"] for r in good if "params" in r]
    out = {"params": torch.stack(multi).numpy()} if multi else {}  # multi-crop: params [B, K, P]
    if encoded and all("loc" in r for r in encoded):
        out["locs"] = np.array([r["loc"] for r in encoded], dtype=np.int64)
    else:
        out["bytes"] = _byte_buffer([r["data"] for r in encoded])
    crops_per_image = len(good[0]["crop"]) if good else 1
    return out | {
        "lengths": [len(r["data"]) for r in encoded],
        "pixels": [r["pixels"] for r in good if "data" not in r],
        "decoded_at": [i for i, r in enumerate(good) if "data" not in r],
        "crops": np.array([r["crop"] for r in good], dtype=np.int64).reshape(-1, crops_per_image, 5),
        "shapes": np.array([r["shape"] for r in good], dtype=np.int64).reshape(-1, 2),
        "modality": [r["modality"] for r in good],
        "source": [r["source"] for r in good],
        "uid": [r["uid"] for r in good],
        "failed": [(r["uid"], r["error"]) for r in rows if "error" in r],
    }


def as_torch(raw: dict[str, Any]) -> dict[str, Any]:
    """A collated batch with its numpy arrays as tensors (in place; returns it)."""
    for key in ("crops", "shapes", "locs", "params"):
        if isinstance(raw.get(key), np.ndarray):
            raw[key] = torch.from_numpy(raw[key])
    return raw


def encoded_views(raw: dict[str, Any], maps: ShardMaps | None) -> list[np.ndarray]:
    """The batch's encoded images as uint8 numpy views (into the shard maps or the batch's
    byte buffer), in sample order, skipping the positions in `decoded_at`. Cached in the batch."""
    views = raw.get("encoded")
    if views is None:
        if "locs" in raw:
            if maps is None:
                raise ValueError("this batch holds shard offsets: pass the loader's ShardMaps")
            views = [maps.view(s)[o : o + n] for s, o, n in raw["locs"].tolist()]
        else:
            flat, ends = raw["bytes"].numpy(), np.cumsum(raw["lengths"]).tolist()
            views = [flat[b:e] for b, e in zip([0] + ends[:-1], ends)]
        raw["encoded"] = views
    return views


def split_encoded(raw: dict[str, Any], maps: ShardMaps | None = None) -> list[torch.Tensor]:
    """encoded_views as 1-D uint8 tensors (no copies)."""
    return [torch.from_numpy(v) for v in encoded_views(raw, maps)]


def encoded_positions(raw: dict[str, Any]) -> list[int]:
    decoded = set(raw["decoded_at"])
    return [i for i in range(len(raw["uid"])) if i not in decoded]


def select(raw: dict[str, Any], keep: list[int], maps: ShardMaps | None = None) -> dict[str, Any]:
    """The batch restricted to the samples at positions `keep` (ascending)."""
    parts = dict(zip(encoded_positions(raw), encoded_views(raw, maps)))
    pixels = dict(zip(raw["decoded_at"], raw["pixels"]))
    enc = [parts[i] for i in keep if i in parts]
    idx = torch.tensor(keep, dtype=torch.int64)
    extra = {"params": raw["params"][idx]} if "params" in raw else {}
    out = raw | extra | {
        "encoded": enc,
        "lengths": [len(v) for v in enc],
        "pixels": [pixels[i] for i in keep if i in pixels],
        "decoded_at": [k for k, i in enumerate(keep) if i in pixels],
        "crops": raw["crops"][idx],
        "shapes": raw["shapes"][idx].reshape(-1, 2),
        "modality": [raw["modality"][i] for i in keep],
        "source": [raw["source"][i] for i in keep],
        "uid": [raw["uid"][i] for i in keep],
    }
    out.pop("locs", None)
    return out


def make_encoded_dataset(streams, *, batch_size, shuffle, seed, cache_dir, num_canonical_nodes, augment, decode_png):
    return make_dataset(streams, batch_size=batch_size, shuffle=shuffle, seed=seed, cache_dir=cache_dir,
                        num_canonical_nodes=num_canonical_nodes, augment=augment,
                        dataset_cls=_make_dataset_class(), decode_png=decode_png)


def encoded_dataloader(dataset, *, batch_size: int, num_workers: int, prefetch_factor: int = 4):
    """Workers stay up between epochs (the crop epoch is shared memory, see EncodedDataset):
    re-forking them each epoch costs a visible stall at tens of thousands of images/s."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_encoded,
        drop_last=True,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )


def shutdown_workers(dataloader) -> None:
    """End a DataLoader's persistent workers now. Left to garbage collection, they may be
    shut down after the StreamingDataset's shared memory is gone, and then each one hangs
    until the DataLoader's 5 s join timeout."""
    iterator = getattr(dataloader, "_iterator", None)
    if iterator is not None:
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        dataloader._iterator = None


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


@dataclasses.dataclass
class PrefetchMeter:
    """Where a prefetching loader's time goes, summed over its lifetime (read it before and after a
    stretch of training and take the difference). Consumer side: `throttle_s` asleep in max_ahead
    (the GPU still had the queued steps: no stall), `wait_s` waiting for the producer (the batch
    was not ready: a data stall), `pending` items whose device work was still running when handed
    over (the step queues behind it on the GPU). Producer side: `produce_s` making items (reading
    encoded batches from the workers, feeding and running the decoder), `full_s` blocked ahead of
    the consumer on a full queue."""

    items: int = 0
    throttle_s: float = 0.0
    wait_s: float = 0.0
    pending: int = 0
    produce_s: float = 0.0
    full_s: float = 0.0

    def snapshot(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @staticmethod
    def per_item(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """ms per item (and the pending share) between two snapshots."""
        n = max(1, after["items"] - before["items"])
        out = {"items": after["items"] - before["items"], "pending_share": (after["pending"] - before["pending"]) / n}
        for k in ("throttle_s", "wait_s", "produce_s", "full_s"):
            out[k.replace("_s", "_ms")] = (after[k] - before[k]) * 1e3 / n
        return out


def prefetch(produce: Callable[[], Iterator[Any]], device: torch.device, depth: int = 2,
             max_ahead: int | None = None, priority: str = "normal",
             meter: PrefetchMeter | None = None) -> Iterator[Any]:
    """Run `produce()` in a background thread, `depth` items ahead of the consumer.

    On CUDA the producer runs on a side stream; each item's tensors are handed to the
    consumer's stream through an event, so decoding overlaps the training step. Items
    are (payload, tensors) pairs; the consumer gets payload. Stops the producer when the
    consumer stops early (break, exception, garbage collection).

    max_ahead (CUDA): before handing out the next item, wait (asleep, GIL released) until the
    GPU has finished all but the last `max_ahead` items' worth of the consumer's queued work. A
    training loop with no host sync otherwise runs ahead until CUDA's launch queue is full and
    then blocks inside a kernel launch *holding the GIL*, which starves this producer thread
    (and any Python feeding the decoder) while the GPU still has work: a data stall.
    None or 0: no limit.

    priority (CUDA): "normal", or "high" for a side stream of the device's highest priority, so
    the producer's kernels are scheduled ahead of the consumer's queued ones.

    meter: a PrefetchMeter to add this run's waits to.
    """
    meter = meter if meter is not None else PrefetchMeter()
    clock = time.perf_counter
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device, priority=cuda_priority(priority)) if cuda else None
    throttle = Throttle(max_ahead, lambda: _cuda_mark(device)) if cuda and max_ahead else None

    def put(item) -> bool:
        t = clock()
        try:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False
        finally:
            meter.full_s += clock() - t

    def run() -> None:
        try:
            if cuda:
                torch.cuda.set_device(device)
            with torch.cuda.stream(side) if cuda else _nullcontext():
                t = clock()
                for payload, tensors in produce():
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(side)
                    meter.produce_s += clock() - t
                    if not put((payload, tensors, event)):
                        return
                    t = clock()
        except BaseException as e:  # re-raised in the consumer
            put(_Failure(e))
            return
        put(_DONE)

    thread = threading.Thread(target=run, name="loader-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            t0 = clock()
            if throttle is not None:
                throttle.step()
            t1 = clock()
            item = q.get()
            meter.throttle_s += t1 - t0
            meter.wait_s += clock() - t1
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            payload, tensors, event = item
            meter.items += 1
            if event is not None:
                meter.pending += not event.query()
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in tensors:
                    t.record_stream(current)
            yield payload
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


STREAM_PRIORITIES = ("normal", "high")


def cuda_priority(name: str) -> int:
    """CUDA stream priority for "normal" (0) or "high" (the device's highest; lower is higher)."""
    if name not in STREAM_PRIORITIES:
        raise ValueError(f"stream_priority must be one of {', '.join(STREAM_PRIORITIES)}; got {name!r}")
    if name == "normal" or not torch.cuda.is_available():
        return 0
    return torch.cuda.Stream.priority_range()[1]


class Throttle:
    """Bounds how far a consumer's queued device work runs ahead: `step()` (once per item handed
    out) sets a mark after the work queued so far, then waits on the oldest marks until at most
    `max_ahead` are pending. `make_mark()` returns an object with `synchronize()`; on CUDA an
    event recorded on the consumer's stream."""

    def __init__(self, max_ahead: int, make_mark: Callable[[], Any]):
        if max_ahead < 1:
            raise ValueError(f"max_ahead must be >= 1, got {max_ahead}")
        self.max_ahead = max_ahead
        self.make_mark = make_mark
        self.pending: collections.deque = collections.deque()

    def step(self) -> None:
        self.pending.append(self.make_mark())
        while len(self.pending) > self.max_ahead:
            self.pending.popleft().synchronize()


def _cuda_mark(device: torch.device) -> torch.cuda.Event:
    mark = torch.cuda.Event(blocking=True)  # sleeps in synchronize (GIL released) instead of spinning a core
    mark.record(torch.cuda.current_stream(device))  # after everything the consumer has queued so far
    return mark


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class EncodedLoader(Loader):
    """Base of the backends that decode on the device: persistent workers deliver encoded
    batches, a prefetch thread runs the subclass's `_produce` (decode, crop, normalize) one or
    more batches ahead on a side stream."""

    decode_png = False  # whether workers decode PNG rows themselves (the device decoder can't)

    def __init__(self, *, streams, batch_size, augment, device, dtype, shuffle, seed, num_workers, cache_dir,
                 num_canonical_nodes, prefetch_batches: int = 2, prefetch_factor: int = 4, max_ahead: int | None = 2,
                 stream_priority: str = "normal"):
        cuda_priority(stream_priority)  # a bad name fails before any work
        dataset = make_encoded_dataset(streams, batch_size=batch_size, shuffle=shuffle, seed=seed, cache_dir=cache_dir,
                                       num_canonical_nodes=num_canonical_nodes, augment=augment,
                                       decode_png=self.decode_png)
        super().__init__(dataset=dataset, batch_size=batch_size, augment=augment, device=device, dtype=dtype)
        self.num_workers = num_workers
        self.prefetch_batches = prefetch_batches
        self.max_ahead = max_ahead  # see prefetch(): batches of GPU work the consumer may queue ahead
        self.stream_priority = stream_priority  # of the side stream(s) the device half runs on
        self.meter = PrefetchMeter()  # the consumer's and the prefetch thread's waits, over the loader's life
        self.prefetch_factor = prefetch_factor
        self._dataloader: torch.utils.data.DataLoader | None = None  # persistent workers
        self.maps = ShardMaps(self.dataset)  # where workers' shard offsets are read

    def _produce(self, batches: Iterator[dict[str, Any]]) -> Iterator[tuple[Any, list[torch.Tensor]]]:
        """Yield ((Batch or None, failed [(uid, reason)]), tensors to keep alive on the side stream)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the persistent workers (before the dataset's shared memory goes away)."""
        dataloader, self._dataloader = self._dataloader, None
        shutdown_workers(dataloader)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _batches(self) -> Iterator[Batch]:
        self.dataset.aug_epoch = self.epoch
        # Workers are forked here, in the caller's thread, not in the prefetch thread.
        if self._dataloader is None:
            self._dataloader = encoded_dataloader(self.dataset, batch_size=self.batch_size,
                                                  num_workers=self.num_workers, prefetch_factor=self.prefetch_factor)
        batches = map(as_torch, iter(self._dataloader))  # workers fork here, in the caller's thread
        for batch, failed in prefetch(lambda: self._produce(batches), self.device, self.prefetch_batches,
                                      self.max_ahead, self.stream_priority, self.meter):
            if failed:
                self._note_skipped(*zip(*failed))
            if batch is not None:
                yield batch
