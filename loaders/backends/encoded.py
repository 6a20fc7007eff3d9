"""What the GPU-decoding backends (`nvjpeg`, `dali`) share: DataLoader workers that read
*encoded* bytes from the MDS shards without decoding them, plus the per-sample crop drawn
from the same RNG as the `cpu` backend, and a prefetch thread that prepares the next
batch on a side CUDA stream while the training step runs.

Workers only parse the image header (dimensions, channels, not truncated) so a crop can
be drawn and garbage rejected early; the decode happens in one batched call on the device.
"""
from __future__ import annotations

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
from loaders.backends.cpu import decode, make_dataset, sample_generator
from loaders.loader import Batch, Loader

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOF markers carrying the frame size (all but DHT=C4, JPG=C8, DAC=CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class ImageHeaderError(ValueError):
    """The bytes are not a complete JPEG or PNG."""


def probe_image(data: bytes) -> tuple[str, int, int, int]:
    """(kind, height, width, channels) of JPEG/PNG bytes from the header alone.

    Raises ImageHeaderError for anything else, and for a JPEG without an end-of-image
    marker after its scan (truncated files: GPU decoders may not notice those).
    """
    if data[:2] == b"\xff\xd8":
        pos, n, size = 2, len(data), None
        while pos + 4 <= n:
            if data[pos] != 0xFF:
                raise ImageHeaderError(f"bad JPEG marker at byte {pos}")
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
                pos += 2
                continue
            (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
            if marker in _SOF:
                if pos + 10 > n:
                    break
                _, h, w, c = struct.unpack(">BHHB", data[pos + 4 : pos + 10])
                size = (h, w, c)
            elif marker == 0xDA:  # start of scan: the entropy-coded data follows
                if size is None:
                    raise ImageHeaderError("JPEG scan before frame header")
                if data.rfind(b"\xff\xd9", pos) < 0:
                    raise ImageHeaderError("JPEG is truncated (no end-of-image marker)")
                h, w, c = size
                if h == 0 or w == 0 or c not in (1, 3, 4):
                    raise ImageHeaderError(f"unsupported JPEG frame {h}x{w}x{c}")
                return "jpeg", h, w, (1 if c == 1 else 3)
            pos += 2 + length
        raise ImageHeaderError("JPEG header is incomplete")
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 26:
        w, h, depth, ctype = struct.unpack(">IIBB", data[16:26])
        if h == 0 or w == 0:
            raise ImageHeaderError("empty PNG")
        return "png", h, w, (1 if ctype in (0, 4) else 3)
    raise ImageHeaderError(f"not a JPEG or PNG (starts with {bytes(data[:8])!r})")


class FastMDSReader:
    """Reads the image/modality/source/uid columns of one local, uncompressed MDS shard
    through a memory map (the MDS layout: a uint32 offset table, then per sample a uint32
    size for each variable-size column followed by the column values in order)."""

    WANTED = ("image", "modality", "source", "uid")

    def __init__(self, shard):
        if type(shard).__name__ != "MDSReader" or getattr(shard, "compression", None):
            raise NotImplementedError("fast path: uncompressed MDS only")
        path = os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename)
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.names = list(shard.column_names)
        self.sizes = list(shard.column_sizes)  # None for variable size
        encodings = dict(zip(self.names, shard.column_encodings))
        for name in self.WANTED:
            if encodings.get(name) != ("bytes" if name == "image" else "str"):
                raise NotImplementedError(f"fast path: unexpected encoding for {name}")
        self.n_var = sum(1 for s in self.sizes if not s)

    def get(self, rel: int) -> dict[str, Any]:
        mm = self.mm
        begin, end = struct.unpack_from("<II", mm, (1 + rel) * 4)
        var = struct.unpack_from(f"<{self.n_var}I", mm, begin)
        pos, k, out = begin + 4 * self.n_var, 0, {}
        for name, size in zip(self.names, self.sizes):
            if not size:
                size = var[k]
                k += 1
            if name in self.WANTED:
                value = mm[pos : pos + size]
                out[name] = value if name == "image" else value.decode("utf-8")
            pos += size
        if pos != end:
            raise ValueError(f"MDS sample {rel} has {end - begin} bytes, columns account for {pos - begin}")
        return out


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
            self._fast_readers: dict[int, FastMDSReader] = {}

        @property
        def aug_epoch(self) -> int:
            return int(self._aug_epoch.value)

        @aug_epoch.setter
        def aug_epoch(self, epoch: int) -> None:
            self._aug_epoch.value = int(epoch)

        def row(self, idx: int, retry: int = 7) -> dict[str, Any]:
            """The columns this loader needs. Local uncompressed MDS shards are read through a
            memory map, decoding only those columns (streaming's get_item opens the shard
            file and decodes every column per sample: the workers' main cost at 30k img/s)."""
            shard_id, rel = self.spanner[idx]
            reader = self._fast_readers.get(shard_id)
            if reader is None:
                try:
                    reader = self._fast_readers[shard_id] = FastMDSReader(self.shards[shard_id])
                except (FileNotFoundError, NotImplementedError):  # not local yet / other format
                    return super().get_item(idx, retry)
            self._shard_access_times[shard_id] = time.time_ns()
            return reader.get(rel)

        def get_item(self, idx: int, retry: int = 7) -> dict[str, Any]:
            row = self.row(idx, retry)
            out = {"modality": row["modality"], "source": row["source"], "uid": row["uid"]}
            try:
                data = row["image"]
                kind, h, w, _ = probe_image(data)
                gen = sample_generator(self.aug_seed, self.aug_epoch, idx)
                # every crop's box, then (multi-crop) the photometric parameters: the cpu backend's order
                out["crop"] = [sample_crop(h, w, spec, gen) for spec in self.augment.crop_specs()]
                if not isinstance(self.augment, AugmentSpec):
                    out["params"] = self.augment.draw_params(gen)
                if kind == "png" and self.decode_png:
                    out["pixels"] = decode(data)
                else:
                    out["data"] = data
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
    """One flat uint8 tensor of all encoded images (one shared-memory buffer per batch,
    not one per image) with their lengths; decoded PNGs ride along as tensors, at the
    positions listed in `decoded_at`. Sample order is the dataset's."""
    good = [r for r in rows if "error" not in r]
    parts = [r["data"] for r in good if "data" in r]
    multi = [r["params"] for r in good if "params" in r]
    out = {"params": torch.stack(multi)} if multi else {}  # multi-crop: params [B, K, P]
    crops_per_image = len(good[0]["crop"]) if good else 1
    return out | {
        "bytes": _byte_buffer(parts),
        "lengths": [len(p) for p in parts],
        "pixels": [r["pixels"] for r in good if "data" not in r],
        "decoded_at": [i for i, r in enumerate(good) if "data" not in r],
        "crops": torch.tensor([r["crop"] for r in good], dtype=torch.int64).reshape(-1, crops_per_image, 5),
        "shapes": torch.tensor([list(r["shape"]) for r in good], dtype=torch.int64).reshape(-1, 2),
        "modality": [r["modality"] for r in good],
        "source": [r["source"] for r in good],
        "uid": [r["uid"] for r in good],
        "failed": [(r["uid"], r["error"]) for r in rows if "error" in r],
    }


def split_encoded(raw: dict[str, Any]) -> list[torch.Tensor]:
    """The batch's encoded images as 1-D uint8 tensors (views into one buffer), in sample
    order, skipping the positions in `decoded_at`."""
    return list(torch.split(raw["bytes"], raw["lengths"])) if raw["lengths"] else []


def encoded_positions(raw: dict[str, Any]) -> list[int]:
    decoded = set(raw["decoded_at"])
    return [i for i in range(len(raw["uid"])) if i not in decoded]


def select(raw: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """The batch restricted to the samples at positions `keep` (ascending)."""
    parts = dict(zip(encoded_positions(raw), split_encoded(raw)))
    pixels = dict(zip(raw["decoded_at"], raw["pixels"]))
    enc = [parts[i] for i in keep if i in parts]
    idx = torch.tensor(keep, dtype=torch.int64)
    extra = {"params": raw["params"][idx]} if "params" in raw else {}
    return raw | extra | {
        "bytes": torch.cat(enc) if enc else torch.empty(0, dtype=torch.uint8),
        "lengths": [len(t) for t in enc],
        "pixels": [pixels[i] for i in keep if i in pixels],
        "decoded_at": [k for k, i in enumerate(keep) if i in pixels],
        "crops": raw["crops"][idx],
        "shapes": raw["shapes"][idx].reshape(-1, 2),
        "modality": [raw["modality"][i] for i in keep],
        "source": [raw["source"][i] for i in keep],
        "uid": [raw["uid"][i] for i in keep],
    }


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


def prefetch(produce: Callable[[], Iterator[Any]], device: torch.device, depth: int = 2) -> Iterator[Any]:
    """Run `produce()` in a background thread, `depth` items ahead of the consumer.

    On CUDA the producer runs on a side stream; each item's tensors are handed to the
    consumer's stream through an event, so decoding overlaps the training step. Items
    are (payload, tensors) pairs; the consumer gets payload. Stops the producer when the
    consumer stops early (break, exception, garbage collection).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run() -> None:
        try:
            if cuda:
                torch.cuda.set_device(device)
            with torch.cuda.stream(side) if cuda else _nullcontext():
                for payload, tensors in produce():
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(side)
                    if not put((payload, tensors, event)):
                        return
        except BaseException as e:  # re-raised in the consumer
            put(_Failure(e))
            return
        put(_DONE)

    thread = threading.Thread(target=run, name="loader-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            payload, tensors, event = item
            if event is not None:
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
                 num_canonical_nodes, prefetch_batches: int = 2, prefetch_factor: int = 4):
        dataset = make_encoded_dataset(streams, batch_size=batch_size, shuffle=shuffle, seed=seed, cache_dir=cache_dir,
                                       num_canonical_nodes=num_canonical_nodes, augment=augment,
                                       decode_png=self.decode_png)
        super().__init__(dataset=dataset, batch_size=batch_size, augment=augment, device=device, dtype=dtype)
        self.num_workers = num_workers
        self.prefetch_batches = prefetch_batches
        self.prefetch_factor = prefetch_factor
        self._dataloader: torch.utils.data.DataLoader | None = None  # persistent workers

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
        batches = iter(self._dataloader)
        for batch, failed in prefetch(lambda: self._produce(batches), self.device, self.prefetch_batches):
            if failed:
                self._note_skipped(*zip(*failed))
            if batch is not None:
                yield batch
