"""The public loader API: `build_loader(shards, backend=..., ...)` -> iterable of `Batch`.

Every backend reads the same MDS shards (loaders/shards.py), applies the same
`AugmentSpec`, and yields the same `Batch`; they differ only in where and how the JPEG
bytes are decoded. Sample order, rank partitioning and mid-epoch resume come from
mosaicml-streaming, so they are identical across backends.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from loaders.augment import AugmentSpec

log = logging.getLogger("loaders")

REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "azure-dl://", "hf://", "sftp://", "dbfs:", "http://",
                  "https://")


@dataclass
class StreamSpec:
    """One shard set: a local folder or a remote URI, with optional mixing weights
    (streaming's `Stream(proportion=..., repeat=..., choose=...)`)."""

    path: str
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None


@dataclass
class Batch:
    """What every backend yields: images on the training device plus per-sample tags."""

    images: torch.Tensor | list[torch.Tensor]  # [B, 3, H, W] or one such tensor per crop
    modality: list[str]
    source: list[str]
    uid: list[str]

    def __len__(self) -> int:
        return len(self.uid)


def as_stream_specs(shards: str | os.PathLike | StreamSpec | dict | Sequence) -> list[StreamSpec]:
    """Accept a path/URI, a StreamSpec, a dict like {"path": ..., "proportion": ...}, or a list of those."""
    if isinstance(shards, (str, os.PathLike, StreamSpec, dict)):
        shards = [shards]
    specs = []
    for item in shards:
        if isinstance(item, StreamSpec):
            specs.append(item)
        elif isinstance(item, dict):
            unknown = set(item) - {"path", "proportion", "repeat", "choose"}
            if unknown or "path" not in item:
                raise ValueError(
                    f"a shard stream needs 'path' and may have proportion/repeat/choose; got keys {sorted(item)}"
                )
            specs.append(StreamSpec(**item))
        else:
            specs.append(StreamSpec(str(item)))
    if not specs:
        raise ValueError("no shard streams given")
    return specs


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def make_streams(specs: list[StreamSpec], cache_dir: str | None = None) -> list:
    """streaming.Stream objects; remote URIs get a local cache folder keyed by the URI."""
    from streaming import Stream

    cache = Path(cache_dir or os.environ.get("BIOVFM_CACHE", Path.home() / ".cache" / "biovfm")) / "streams"
    streams = []
    for s in specs:
        kw = dict(proportion=s.proportion, repeat=s.repeat, choose=s.choose)
        if is_remote(s.path):
            local = cache / hashlib.sha1(s.path.encode()).hexdigest()[:16]
            streams.append(Stream(remote=s.path, local=str(local), **kw))
        else:
            if not (Path(s.path) / "index.json").is_file():
                raise FileNotFoundError(
                    f"no MDS shards at {s.path!r} (index.json missing); build them with `python -m loaders.ingest`"
                )
            streams.append(Stream(local=str(Path(s.path).resolve()), **kw))
    return streams


def count_samples(shards) -> int | None:
    """Number of samples in local shard sets without opening a dataset (None if remote/unknown)."""
    import json

    total = 0
    for s in as_stream_specs(shards):
        index = Path(s.path) / "index.json"
        if is_remote(s.path) or not index.is_file():
            return None
        total += sum(shard["samples"] for shard in json.loads(index.read_text())["shards"])
    return total


# ---------------------------------------------------------------- CUDA hardware queues
CUDA_CONNECTIONS = "32"
_warned_connections = False


def prepare_cuda(connections: str = CUDA_CONNECTIONS) -> str:
    """Give CUDA `connections` hardware work queues (CUDA_DEVICE_MAX_CONNECTIONS; CUDA's default is 8)
    unless the environment already chose a value. Call it before anything starts CUDA: the
    setting is read when the CUDA context is created.

    Why: with 8 queues the decoders' streams (DALI's, nvJPEG's, the prefetch stream) share hardware
    queues with the training stream, so the few hundred per-image syncs of each decoded batch wait
    behind the step's already-queued kernels. Measured on an H200 (MAE ViT-B, whole model
    compiled and replayed as CUDA graphs, bench/results/loaders-nvidia-h200-2026-11-28-stall-graphs-conn32.json):
    the dali stall fell from 11-13 % to 1.4-2.0 %, nvjpeg from 19-20 % to 4.2-5.6 %.

    Returns "set" (this call set it), "kept" (the environment had a value), or "late" (CUDA had
    already started: the setting cannot take effect in this process)."""
    if "CUDA_DEVICE_MAX_CONNECTIONS" in os.environ:
        return "kept"
    if torch.cuda.is_initialized():
        return "late"
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = str(connections)
    return "set"


def _check_cuda_queues(device: torch.device, backend: str) -> None:
    """Warn once when a GPU decoder shares CUDA's default 8 hardware queues with training."""
    global _warned_connections
    if device.type != "cuda" or backend not in ("dali", "nvjpeg") or _warned_connections:
        return
    if prepare_cuda() == "late":
        _warned_connections = True
        log.warning("CUDA started before CUDA_DEVICE_MAX_CONNECTIONS was set: the %s decoder shares CUDA's 8 "
                    "hardware queues with the training step (measured: 11-20 %% data stall under CUDA graphs, "
                    "1.4-5.6 %% with 32). Export CUDA_DEVICE_MAX_CONNECTIONS=32, or call "
                    "loaders.prepare_cuda() before anything touches CUDA.", backend)


# ---------------------------------------------------------------- backend registry
BackendFactory = Callable[..., "Loader"]
BACKENDS: dict[str, BackendFactory] = {}
# `auto` picks the first of these that is available for the device.
AUTO_ORDER = ("dali", "nvjpeg", "cpu")


def register_backend(name: str, available: Callable[[torch.device], bool] = lambda d: True):
    def wrap(factory: BackendFactory) -> BackendFactory:
        factory.available = available  # type: ignore[attr-defined]
        BACKENDS[name] = factory
        return factory

    return wrap


KNOWN_BACKENDS = ("cpu", "nvjpeg", "dali", "ffcv")


def _load_backends(names=KNOWN_BACKENDS) -> None:
    """Import backend modules (importing one registers it); an optional one may fail to import.
    Only the ones asked for: some (ffcv, dali) take seconds to import."""
    import importlib

    for mod in names:
        if mod in BACKENDS:
            continue
        try:
            importlib.import_module(f"loaders.backends.{mod}")
        except ImportError as e:  # an optional dependency is missing
            log.debug("loader backend %s unavailable: %s", mod, e)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    _load_backends()
    device = torch.device(device)
    return [n for n, f in BACKENDS.items() if f.available(device)]  # type: ignore[attr-defined]


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        for name in AUTO_ORDER:
            _load_backends([name])
            if name in BACKENDS and BACKENDS[name].available(device):  # type: ignore[attr-defined]
                return name
        return "cpu"
    _load_backends([backend] if backend in KNOWN_BACKENDS else KNOWN_BACKENDS)
    if backend not in BACKENDS:
        known = sorted(set(BACKENDS) | {"auto", *KNOWN_BACKENDS})
        raise ValueError(f"unknown loader backend {backend!r}; valid: {', '.join(known)}")
    if not BACKENDS[backend].available(device):  # type: ignore[attr-defined]
        raise RuntimeError(
            f"loader backend {backend!r} is not available on {device}; available: "
            f"{', '.join(available_backends(device))}"
        )
    return backend


def build_loader(
    shards,
    *,
    backend: str = "auto",
    batch_size: int,
    augment: AugmentSpec | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int | None = None,
    cache_dir: str | None = None,
    num_canonical_nodes: int | None = None,
    **backend_options: Any,
) -> "Loader":
    """Build a loader over MDS shards.

    shards: a local folder, a remote URI (s3://, gs://, ...), or a list of streams
        (paths, `StreamSpec`s or dicts with `path` and `proportion`/`repeat`/`choose`).
    backend: "auto", "cpu", "nvjpeg", "dali" or "ffcv" (see `available_backends()`).
    batch_size: per-rank batch size. Ranks are taken from torch.distributed / torchrun's env.
    device: where batches land (default: cuda if available, else cpu).
    Returns a `Loader`: iterate for `Batch`es, `len()` batches per epoch,
    `state_dict()` / `load_state_dict()` for exact mid-epoch resume.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = resolve_backend(backend, device)
    _check_cuda_queues(device, name)
    if num_workers is None:
        num_workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    return BACKENDS[name](
        streams=as_stream_specs(shards),
        batch_size=batch_size,
        augment=augment or AugmentSpec(),
        device=device,
        dtype=dtype,
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        cache_dir=cache_dir,
        num_canonical_nodes=num_canonical_nodes,
        **backend_options,
    )


class Loader:
    """Base for backends. Subclasses implement `_batches()` yielding `Batch`es of one epoch
    and count consumed samples; this class does epoch/position bookkeeping and resume."""

    backend = "base"

    def __init__(self, *, dataset, batch_size: int, augment: AugmentSpec, device: torch.device, dtype: torch.dtype):
        self.dataset = dataset  # a streaming.StreamingDataset (order, partitioning, resume)
        self.batch_size = batch_size
        self.augment = augment
        self.device = device
        self.dtype = dtype
        self.epoch = 0
        self.batches_in_epoch = 0  # delivered to the caller in the current epoch
        self.skipped = 0  # samples that failed to decode, total
        self._resume: dict | None = None

    # subclasses -------------------------------------------------------------
    def _batches(self) -> Iterator[Batch]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_size

    # bookkeeping -------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        if self._resume is not None:
            self.dataset.load_state_dict(self._resume)
            self._resume = None
        for batch in self._batches():
            self.batches_in_epoch += 1
            yield batch
        self.epoch += 1
        self.batches_in_epoch = 0

    def _world(self) -> int:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return int(os.environ.get("WORLD_SIZE", 1))

    def state_dict(self) -> dict[str, Any]:
        consumed = self.batches_in_epoch * self.batch_size * self._world()
        return {
            "backend": self.backend,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "skipped": self.skipped,
            "dataset": self.dataset.state_dict(consumed, True) | {"epoch": self.epoch},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.skipped = int(state.get("skipped", 0))
        self._resume = dict(state["dataset"])

    def close(self) -> None:
        """Release worker processes and device pipelines now (backends that keep them
        between epochs override this); the loader can still be iterated afterwards."""

    def _note_skipped(self, uids: list[str], reasons: list[str]) -> None:
        for uid, why in zip(uids, reasons):
            self.skipped += 1
            if self.skipped <= 20:
                log.warning("skipped sample %s: %s", uid, why)
            elif self.skipped == 21:
                log.warning("more samples failed to decode; counting them silently (see loader.skipped)")
