"""`cpu` backend: DataLoader worker processes decode (libjpeg-turbo via torchvision.io) and
crop/resize on the CPU; uint8 crops travel to the device, where they are normalized.

The fallback everywhere and the baseline the GPU backends are measured against.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torchvision.io import ImageReadMode, decode_image

from loaders.augment import AugmentSpec, SampleRNG
from loaders.loader import Batch, Loader, make_streams, register_backend


def sample_generator(seed: int, epoch: int, index: int) -> SampleRNG:
    """The RNG of one sample's augmentation: a function of (seed, epoch, sample index) only,
    so crops do not depend on worker count or order, and resume is exact."""
    seed, epoch, index = int(seed), int(epoch), int(index)  # numpy ints would overflow
    key = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**63 - 1)
    return SampleRNG(key)


def decode(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 [C, H, W] with C = 1 or 3."""
    img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    if img.shape[0] == 4:  # RGBA: drop alpha
        img = img[:3]
    elif img.shape[0] == 2:  # gray + alpha
        img = img[:1]
    return img


def _make_dataset_class():
    from streaming import StreamingDataset

    from loaders.backends.barrier import fast_epoch_barrier

    class DecodingDataset(StreamingDataset):
        """StreamingDataset whose items are decoded, augmented crops (or an error record)."""

        def __init__(self, *, augment: AugmentSpec, aug_seed: int, **kwargs: Any):
            super().__init__(**kwargs)
            self.augment = augment
            self.aug_seed = aug_seed
            self.aug_epoch = 0  # set by the loader before each epoch; workers inherit it

        def __iter__(self):
            # the epoch start's barrier polls every ms, not every 50 (loaders.backends.barrier)
            fast_epoch_barrier(self)
            yield from super().__iter__()

        def get_item(self, idx: int, retry: int = 7) -> dict[str, Any]:
            row = super().get_item(idx, retry)
            out = {"modality": row["modality"], "source": row["source"], "uid": row["uid"]}
            try:
                gen = sample_generator(self.aug_seed, self.aug_epoch, idx)
                out["views"] = self.augment.views(decode(row["image"]), gen)
            except Exception as e:  # a corrupt sample is skipped and counted, never substituted
                out["error"] = f"{type(e).__name__}: {e}"
            return out

    return DecodingDataset


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in rows if "error" not in r]
    bad = [r for r in rows if "error" in r]
    views = [torch.stack(v) for v in zip(*(r["views"] for r in good))]
    return {
        "views": views,
        "modality": [r["modality"] for r in good],
        "source": [r["source"] for r in good],
        "uid": [r["uid"] for r in good],
        "failed": [(r["uid"], r["error"]) for r in bad],
    }


def make_dataset(streams, *, batch_size, shuffle, seed, cache_dir, num_canonical_nodes, augment, dataset_cls=None,
                 **extra):
    """The streaming dataset of a backend (`dataset_cls`, default the decoding one); `extra`
    goes to the class (e.g. the encoded backends' `decode_png`)."""
    cls = dataset_cls or _make_dataset_class()
    return cls(
        streams=make_streams(streams, cache_dir),
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=seed,
        num_canonical_nodes=num_canonical_nodes,
        augment=augment,
        aug_seed=seed,
        **extra,
    )


class CPULoader(Loader):
    backend = "cpu"

    def __init__(self, *, streams, batch_size, augment, device, dtype, shuffle, seed, num_workers, cache_dir,
                 num_canonical_nodes, pin_memory: bool | None = None, prefetch_factor: int = 4):
        dataset = make_dataset(streams, batch_size=batch_size, shuffle=shuffle, seed=seed, cache_dir=cache_dir,
                               num_canonical_nodes=num_canonical_nodes, augment=augment)
        super().__init__(dataset=dataset, batch_size=batch_size, augment=augment, device=device, dtype=dtype)
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = device.type == "cuda" if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor

    def _dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            drop_last=True,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,  # workers must see the new aug_epoch each epoch
            # Its own generator: starting an epoch must not draw from the global RNG, which the
            # model uses (masking), or a resumed run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _to_device(self, raw: dict[str, Any]) -> Batch:
        views = [v.to(self.device, non_blocking=True) for v in raw["views"]]
        return Batch(self.augment.finish(views, self.dtype), raw["modality"], raw["source"], raw["uid"])

    def _batches(self) -> Iterator[Batch]:
        self.dataset.aug_epoch = self.epoch
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pending: Batch | None = None
        for raw in self._dataloader():
            if raw["failed"]:
                self._note_skipped(*zip(*raw["failed"]))
            if not raw["uid"]:
                continue
            if stream is not None:
                # Copy and normalize on a side stream so they overlap the training step.
                with torch.cuda.stream(stream):
                    batch = self._to_device(raw)
                if pending is not None:
                    yield pending
                torch.cuda.current_stream(self.device).wait_stream(stream)
                for t in batch.images if isinstance(batch.images, list) else [batch.images]:
                    t.record_stream(torch.cuda.current_stream(self.device))
                pending = batch
            else:
                yield self._to_device(raw)
        if pending is not None:
            yield pending


register_backend("cpu")(CPULoader)
