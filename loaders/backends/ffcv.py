"""`ffcv` backend: the MDS shards are converted once into an FFCV `.beton` file (cached,
keyed by the shards' index.json), then read with FFCV's loader: JIT-compiled
decode + random-resized-crop in threads, flip, copy to the device, normalize there.

Conversion keeps the shards' JPEG bytes as they are (no re-encoding); PNG rows are stored
as raw RGB pixels. Every row is decoded once during conversion: rows that fail are left
out of the .beton, listed in the side table, and counted as skipped once per epoch. The
side table (`table.json`) maps each .beton row back to its uid / modality / source.

Semantics versus the other backends: the crop and flip are FFCV's own draws (the same
RandomResizedCrop algorithm and parameters, so the same distribution, but not the same
crop of a given sample as `cpu`/`nvjpeg`/`dali`). Sample order is FFCV's, a function of
(seed, epoch) and the rank. Resume: `state_dict()` records the epoch and the number of
batches delivered; `load_state_dict()` makes the next epoch start after those batches of
that same (seed, epoch) order, so the remaining samples are exactly those not yet seen.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from loaders.loader import Batch, Loader, is_remote, make_streams, register_backend

try:
    import ffcv  # noqa: F401
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader as FFCVLoader, OrderOption
    from ffcv.traversal_order import Random, Sequential
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage
    from ffcv.writer import DatasetWriter
except ImportError:  # optional dependency: the backend is simply unavailable
    ffcv = None

log = logging.getLogger("loaders")

FORMAT_VERSION = 1  # bump when the .beton layout or the side table changes


# ------------------------------------------------------------------ conversion
if ffcv is not None:

    class EncodedImageField(RGBImageField):
        """RGBImageField that stores JPEG bytes as given (no decode + re-encode) and
        decoded pixels (PNG rows) raw. Values are (kind, payload, height, width)."""

        def encode(self, destination, value, malloc):
            kind, payload, height, width = value
            destination["height"], destination["width"] = height, width
            if kind == "jpeg":
                destination["mode"] = IMAGE_MODES["jpg"]
                data = np.frombuffer(payload, dtype=np.uint8)
            else:
                destination["mode"] = IMAGE_MODES["raw"]
                data = np.ascontiguousarray(payload, dtype=np.uint8).reshape(-1)
            destination["data_ptr"], storage = malloc(data.nbytes)
            storage[:] = data


class _Rows(torch.utils.data.Dataset):
    """Rows of a StreamingDataset by global index: checked (decoded once) or as FFCV values."""

    def __init__(self, dataset, check: bool):
        self.dataset = dataset
        self.check = check

    def __len__(self) -> int:
        return self.dataset.num_samples

    def __getitem__(self, i: int):
        from loaders.backends.cpu import decode
        from loaders.backends.encoded import probe_image

        row = self.dataset.get_item(int(i))
        if self.check:
            tags = {"uid": row["uid"], "modality": row["modality"], "source": row["source"]}
            try:
                kind, h, w, _ = probe_image(row["image"])
                img = decode(row["image"])
                if tuple(img.shape[1:]) != (h, w):
                    raise ValueError(f"header says {h}x{w}, pixels are {tuple(img.shape[1:])}")
                return tags | {"error": None}
            except Exception as e:
                return tags | {"error": f"{type(e).__name__}: {e}"}
        kind, h, w, _ = probe_image(row["image"])
        if kind == "jpeg":
            return (kind, row["image"], h, w), int(i)
        img = decode(row["image"]).expand(3, -1, -1).permute(1, 2, 0).numpy()
        return ("raw", img, h, w), int(i)


def _cache_key(streams) -> str:
    h = hashlib.sha1(f"ffcv-v{FORMAT_VERSION}".encode())
    for s in streams:
        if is_remote(s.path):
            h.update(s.path.encode())
        else:
            h.update(str(Path(s.path).resolve()).encode())
            h.update((Path(s.path) / "index.json").read_bytes())
    return h.hexdigest()[:20]


def convert_to_beton(streams, out_dir: Path, *, cache_dir: str | None, num_workers: int) -> None:
    """MDS shards -> out_dir/data.beton + out_dir/table.json (written atomically)."""
    from streaming import StreamingDataset

    dataset = StreamingDataset(streams=make_streams(streams, cache_dir), shuffle=False, batch_size=1)
    rows = _Rows(dataset, check=True)
    checked = torch.utils.data.DataLoader(rows, batch_size=64, num_workers=num_workers, collate_fn=lambda b: b)
    table: dict[str, Any] = {"uid": [], "modality": [], "source": [], "failed": [], "format": FORMAT_VERSION}
    good = []
    for chunk in checked:
        for r in chunk:
            i = len(table["uid"])
            for k in ("uid", "modality", "source"):
                table[k].append(r[k])
            if r["error"] is None:
                good.append(i)
            else:
                table["failed"].append([r["uid"], r["error"]])
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"data.beton.tmp{os.getpid()}"
    fields = {"image": EncodedImageField(), "index": IntField()}
    writer = DatasetWriter(str(tmp), fields, num_workers=max(1, num_workers))
    writer.from_indexed_dataset(_Rows(dataset, check=False), indices=good, chunksize=64)
    del dataset
    (out_dir / "table.json.tmp").write_text(json.dumps(table))
    os.replace(tmp, out_dir / "data.beton")
    os.replace(out_dir / "table.json.tmp", out_dir / "table.json")
    log.info("ffcv: wrote %d rows (%d failed to decode) to %s", len(good), len(table["failed"]), out_dir)


def beton_for(streams, *, cache_dir: str | None, num_workers: int, rank: int) -> Path:
    """The cached conversion of these shards; rank 0 writes it, other ranks wait for it."""
    for s in streams:
        if s.proportion is not None or s.repeat is not None or s.choose is not None:
            raise ValueError("the ffcv backend reads whole shard sets: stream proportion/repeat/choose "
                             "are not supported (use the cpu, nvjpeg or dali backend)")
    root = Path(cache_dir or os.environ.get("BIOVFM_CACHE", Path.home() / ".cache" / "biovfm")) / "ffcv"
    out = root / _cache_key(streams)
    if not (out / "table.json").is_file():
        if rank == 0:
            convert_to_beton(streams, out, cache_dir=cache_dir, num_workers=num_workers)
        else:
            while not (out / "table.json").is_file():
                time.sleep(1.0)
    return out


# ------------------------------------------------------------------ loading
if ffcv is not None:

    class _ResumableOrder(Random):
        """FFCV's Random (or sequential) order for an epoch, minus its first `skip` samples."""

        def __init__(self, loader, shuffle: bool):
            super().__init__(loader)
            self.shuffle = shuffle
            self.sequential = Sequential(loader)
            self.skip = 0

        def sample_order(self, epoch: int):
            order = super().sample_order(epoch) if self.shuffle else self.sequential.sample_order(epoch)
            full = len(order) // self.loader.batch_size * self.loader.batch_size  # drop_last, as FFCV does
            return order[self.skip : full]


class FFCVBackendLoader(Loader):
    backend = "ffcv"

    def __init__(self, *, streams, batch_size, augment, device, dtype, shuffle, seed, num_workers, cache_dir,
                 num_canonical_nodes, os_cache: bool = True, batches_ahead: int = 3):
        from loaders.augment import AugmentSpec

        if ffcv is None:
            raise RuntimeError("the ffcv backend needs ffcv (pip install ffcv; see README for its system packages)")
        if not isinstance(augment, AugmentSpec):
            raise TypeError(f"the ffcv backend implements AugmentSpec only, got {type(augment).__name__}; "
                            "use backend='dali', 'nvjpeg' or 'cpu' for multi-crop specs")
        super().__init__(dataset=None, batch_size=batch_size, augment=augment, device=device, dtype=dtype)
        self.rank = (torch.distributed.get_rank()
                     if torch.distributed.is_available() and torch.distributed.is_initialized()
                     else int(os.environ.get("RANK", 0)))
        self.root = beton_for(streams, cache_dir=cache_dir, num_workers=num_workers, rank=self.rank)
        table = json.loads((self.root / "table.json").read_text())
        self.uids, self.modalities, self.sources = table["uid"], table["modality"], table["source"]
        self.failed = [tuple(f) for f in table["failed"]]
        size = augment.size
        image = [RandomResizedCropRGBImageDecoder((size, size), scale=augment.scale, ratio=augment.ratio)]
        if augment.hflip > 0:
            image.append(RandomHorizontalFlip(flip_prob=augment.hflip))
        image += [ToTensor()]
        if device.type == "cuda":
            image.append(ToDevice(device, non_blocking=True))
        image.append(ToTorchImage())
        threads = torch.get_num_threads()  # FFCV sets torch's thread count to its own: undo that
        self.ffcv = FFCVLoader(
            str(self.root / "data.beton"),
            batch_size=batch_size,
            num_workers=max(1, num_workers),
            os_cache=os_cache,
            order=OrderOption.RANDOM,
            distributed=self._world() > 1,
            seed=seed,
            pipelines={"image": image, "index": [IntDecoder(), ToTensor()]},
            custom_fields={"image": EncodedImageField},
            drop_last=True,
            batches_ahead=batches_ahead,
        )
        self.ffcv.traversal_order = _ResumableOrder(self.ffcv, shuffle)
        torch.set_num_threads(threads)

    def __len__(self) -> int:
        return len(self.ffcv)

    def state_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend", self.backend) != self.backend:
            raise ValueError(f"state is from the {state['backend']!r} backend; ffcv orders samples differently")
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.skipped = int(state.get("skipped", 0))

    def _batches(self) -> Iterator[Batch]:
        if self.batches_in_epoch == 0 and self.failed and self.rank == 0:
            uids, reasons = zip(*self.failed)
            self._note_skipped(list(uids), list(reasons))
        order = self.ffcv.traversal_order
        order.skip = self.batches_in_epoch * self.batch_size
        self.ffcv.next_epoch = self.epoch  # the order is a function of (seed, epoch)
        threads = torch.get_num_threads()
        epoch = iter(self.ffcv)
        torch.set_num_threads(threads)
        try:
            for images, index in epoch:
                idx = index.reshape(-1).tolist()
                out = self.augment.finish([images], self.dtype).contiguous()
                yield Batch(out, [self.modalities[i] for i in idx], [self.sources[i] for i in idx],
                            [self.uids[i] for i in idx])
        finally:
            order.skip = 0


register_backend("ffcv", available=lambda d: ffcv is not None)(FFCVBackendLoader)
