"""`dali` backend: DataLoader workers read encoded bytes from the MDS shards and draw each
sample's crop; a DALI pipeline decodes on the GPU (`mixed`: the hardware JPEG engines of
A100/H100/H200 plus CUDA), crops + resizes + flips in one `fn.resize` over a region of
interest, and normalizes into CHW fp16/fp32, which lands in a torch tensor on the GPU.

Crops are the `cpu` backend's (same per-sample RNG, `sample_crop`), so the backends differ
only in the decoder. With `device="cpu"` the pipeline runs CPU-only (`device_id=None`), which
is how CI tests it. With a `MultiCropSpec` (DINOv2) the pipeline decodes each image once and
resizes one region per crop into uint8 outputs; the spec's `finish` then applies the photometric
ops and normalization batched in torch. A batch DALI cannot decode is replayed sample by sample to find the
culprits, which are skipped and counted; the rest of the batch is kept. With `pipelines=n` the batches are dealt
to n pipelines in turn and their outputs taken in the same turn (the epoch's order kept).
"""
from __future__ import annotations

import collections
import gc
import os
import time
from typing import Any, Iterator

import numpy as np
import torch

from loaders.loader import Batch, register_backend
from loaders.backends.encoded import EncodedLoader, encoded_views, select
from loaders.multicrop import MultiCropSpec

try:
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline, StreamPolicy
except ImportError:  # optional dependency: the backend is simply unavailable
    fn = types = Pipeline = StreamPolicy = None

DALI_STREAM_POLICIES = {"single": "SINGLE", "backend": "PER_BACKEND", "operator": "PER_OPERATOR"}


def default_threads() -> int:
    """DALI's CPU threads per pipeline when the loader is not told (dali_threads=None): 4, or fewer on a smaller
    machine."""
    return max(1, min(4, os.cpu_count() or 1))


def roi(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top, left, h, w, flip) rows -> fn.resize's roi_start / roi_end, [B, 2] in (y, x) order
    (one dense array per batch: cheaper to feed than B small ones); a flipped crop has its x
    ends swapped, which makes fn.resize mirror it."""
    top, left, h, w, flip = (crops[:, i].astype(np.float32) for i in range(5))
    x0 = np.where(flip > 0, left + w, left)
    x1 = np.where(flip > 0, left, left + w)
    start = np.stack([top, x0], 1)
    end = np.stack([top + h, x1], 1)
    return start, end


def crop_box(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, h, w, flip) rows -> decoders.image_slice's start / end, [B, 2] int32 in (y, x) order,
    and crop_mirror_normalize's mirror flag, [B] int32 (the `decode_crop` pipeline)."""
    c = crops.astype(np.int32)
    top, left, h, w, flip = (c[:, i] for i in range(5))
    return np.stack([top, left], 1), np.stack([top + h, left + w], 1), np.ascontiguousarray(flip > 0, np.int32)


def input_names(n_sizes: int, decode_crop: bool) -> list[str]:
    """The pipeline's external-source names, in the order `DaliLoader._inputs` gives them."""
    if decode_crop:
        return ["jpegs", "crop_start", "crop_end", "mirror"]
    return ["jpegs"] + [f"roi_{end}_{k}" for k in range(n_sizes) for end in ("start", "end")]


def build_pipeline(*, batch_size: int, sizes: list[int], normalize: bool, mean, std, device: torch.device,
                   out_dtype: torch.dtype, num_threads: int, hw_decoder_load: float, prefetch_queue_depth: int,
                   source=None, no_copy: bool = False, exec_dynamic: bool | None = None,
                   stream_policy: str | None = None, decode_crop: bool = False,
                   hybrid_huffman_threshold: int | None = None) -> "Pipeline":
    """The decode -> crop/resize/flip -> normalize graph. Inputs come from `source`
    (a batch callback returning jpegs, then roi_start and roi_end per crop) or, with
    source=None, from `pipe.run(jpegs=..., roi_start_0=..., roi_end_0=..., ...)`.

    One resized crop per entry of `sizes` from the one decoded image, normalized here into
    `out_dtype` CHW (`normalize`, the single-view spec) or output as uint8 CHW (multi-crop: the
    photometric ops and normalization run batched in torch). exec_dynamic: DALI's execution
    model (None: DALI's default, the dynamic one for an asynchronous pipeline; False: the legacy
    executor, whose buffers are allocated once). stream_policy (dynamic executor): "single" (every
    operator on one CUDA stream), "backend" (DALI's default: one per backend, mixed and gpu) or
    "operator" (one per operator that can run in parallel); None leaves DALI's default.
    decode_crop (one normalized size only): the decoder decodes only each sample's crop box
    (`decoders.image_slice`; inputs jpegs, crop_start, crop_end, mirror, see `crop_box`), then the box is
    resized whole and mirrored by crop_mirror_normalize. The pixels match the default path's except on the
    crop's one-pixel border, where fn.resize's filter reads the neighbours outside the box.
    hybrid_huffman_threshold: DALI's decoder setting for the JPEGs that do not go to the hardware decoder
    (hw_decoder_load < 1): images with more pixels than this have their Huffman stage decoded on the GPU, smaller
    ones on DALI's CPU threads; None leaves DALI's default (10^6 pixels: every 256- or 512-px image on the CPU)."""
    if decode_crop and (len(sizes) != 1 or not normalize):
        raise ValueError("decode_crop decodes one crop per image: a single normalized size only (not multi-crop)")
    gpu = device.type == "cuda"
    policy = {}
    if stream_policy is not None and source is not None and exec_dynamic is not False:
        policy["stream_policy"] = getattr(StreamPolicy, DALI_STREAM_POLICIES[stream_policy])
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device.index if gpu else None,
        prefetch_queue_depth=prefetch_queue_depth,
        exec_pipelined=source is not None,
        exec_async=source is not None,
        **({} if exec_dynamic is None or source is None else {"exec_dynamic": exec_dynamic}),
        **policy,
    )
    with pipe:
        names = input_names(len(sizes), decode_crop)
        if decode_crop:
            dtypes, ndims = [types.UINT8, types.INT32, types.INT32, types.INT32], [1, 1, 1, 0]
        else:
            dtypes, ndims = [types.UINT8] + [types.FLOAT] * (2 * len(sizes)), [1] * len(names)
        if source is not None:
            inputs = fn.external_source(source=source, num_outputs=len(names), batch=True, dtype=dtypes,
                                        ndim=ndims, no_copy=no_copy)
        else:
            inputs = [fn.external_source(name=n, dtype=d, ndim=k) for n, d, k in zip(names, dtypes, ndims)]
        jpegs = inputs[0]
        dali_dtype = types.FLOAT16 if out_dtype == torch.float16 else types.FLOAT
        norm = dict(output_layout="CHW", mean=[m * 255 for m in mean], std=[s * 255 for s in std])
        # adjust_orientation=False: the pixels as stored, as the other backends decode them and as the crops were
        # drawn (from the frame header's size); DALI's default turns EXIF-rotated JPEGs, swapping their sides
        huff = {} if hybrid_huffman_threshold is None else {"hybrid_huffman_threshold": hybrid_huffman_threshold}
        if decode_crop:
            box = fn.decoders.image_slice(jpegs, start=inputs[1], end=inputs[2], axis_names="HW",
                                          device="mixed" if gpu else "cpu", output_type=types.RGB,
                                          adjust_orientation=False, **huff,
                                          **({"hw_decoder_load": hw_decoder_load} if gpu else {}))
            crop = fn.resize(box, size=[sizes[0], sizes[0]], antialias=True)
            outputs = [fn.crop_mirror_normalize(crop, mirror=inputs[3], dtype=dali_dtype, **norm)]
        else:
            if gpu:
                images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB,
                                           hw_decoder_load=hw_decoder_load, adjust_orientation=False, **huff)
            else:
                images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, adjust_orientation=False,
                                           **huff)
            outputs = []
            for k, side in enumerate(sizes):
                crop = fn.resize(images, roi_start=inputs[1 + 2 * k], roi_end=inputs[2 + 2 * k],
                                 size=[side, side], antialias=True)
                outputs.append(fn.crop_mirror_normalize(crop, dtype=dali_dtype, **norm) if normalize
                               else fn.transpose(crop, perm=[2, 0, 1]))
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


def _reason(error: Exception) -> str:
    """DALI's error text without its traceback boilerplate."""
    text = str(error)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return f"DALI decode failed: {text[:300]}"


def to_torch(output, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A dense DALI TensorList of `dtype` -> torch tensor on `device` (no host round trip on GPU)."""
    tensor = output.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tensor.shape(), dtype=dtype, device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tensor))


class _Feed:
    """One epoch's input state, shared with DALI's source callback."""

    def __init__(self, batches: Iterator[dict[str, Any]]):
        self.batches = batches
        self.replay: collections.deque = collections.deque()  # fed to a pipeline that then failed
        self.inflight: collections.deque = collections.deque()  # (raw, carried failures), DALI's order
        self.carry: list[tuple[str, str]] = []  # failures of batches with no decodable sample left


class _Dealer:
    """The epoch's batches dealt to the n pipelines in turn (batch i to pipeline i mod n; n = 1: all of them),
    each pipeline's share buffered until its source callback asks for it. A batch with no sample left (all failed in the
    workers) is not dealt: its failures ride on the next dealt batch, so every pipeline's k-th batch is the
    epoch's (k*n + j)-th dealt one and taking outputs from the pipelines in turn keeps the epoch's order."""

    def __init__(self, batches: Iterator[dict[str, Any]], n: int):
        self.batches, self.n = batches, n
        self.pending = [collections.deque() for _ in range(n)]
        self.turn = 0
        self.carry: list[tuple[str, str]] = []  # failures waiting for the next dealt batch (or the epoch's end)
        self.done = False

    def _next(self) -> dict[str, Any]:
        while True:
            raw = next(self.batches)  # StopIteration: the epoch's end
            if raw["uid"]:
                if self.carry:
                    raw = dict(raw, failed=self.carry + list(raw["failed"]))
                    self.carry = []
                return raw
            self.carry.extend(raw["failed"])

    def stream(self, j: int) -> Iterator[dict[str, Any]]:
        """Pipeline j's batches, in order."""
        while True:
            while not self.pending[j]:
                if self.done:
                    return
                try:
                    raw = self._next()
                except StopIteration:
                    self.done = True
                    return
                self.pending[self.turn].append(raw)
                self.turn = (self.turn + 1) % self.n
            yield self.pending[j].popleft()


class DaliLoader(EncodedLoader):
    backend = "dali"

    def __init__(self, *, streams, batch_size, augment, device, dtype, shuffle, seed, num_workers, cache_dir,
                 num_canonical_nodes, dali_threads: int | None = None, hw_decoder_load: float = 1.0,
                 prefetch_queue_depth: int = 3, prefetch_batches: int = 2, prefetch_factor: int = 4,
                 no_copy: bool = True, max_ahead: int | None = 2, stream_priority: str = "normal",
                 exec_dynamic: bool | None = None, stream_policy: str | None = None, stage_inputs: bool = False,
                 decode_crop: bool = False, hybrid_huffman_threshold: int | None = None, pipelines: int = 1):
        # stream_priority: of the side stream the outputs are copied on (DALI 2.4 ignores its own
        # `default_cuda_stream_priority`, deprecated), so it reaches only that copy
        if Pipeline is None:
            raise RuntimeError("the dali backend needs nvidia-dali (pip install nvidia-dali-cuda130)")
        if stream_policy is not None and stream_policy not in DALI_STREAM_POLICIES:
            raise ValueError(f"stream_policy must be one of {', '.join(DALI_STREAM_POLICIES)}; got {stream_policy!r}")
        if not isinstance(pipelines, int) or pipelines < 1:
            raise ValueError(f"pipelines must be a positive int; got {pipelines!r}")
        if hybrid_huffman_threshold is not None and hybrid_huffman_threshold < 0:
            raise ValueError(f"hybrid_huffman_threshold must be >= 0 (pixels); got {hybrid_huffman_threshold}")
        if decode_crop and isinstance(augment, MultiCropSpec):
            raise ValueError("decode_crop decodes one crop per image; a MultiCropSpec takes several (leave it off)")
        super().__init__(streams=streams, batch_size=batch_size, augment=augment, device=device, dtype=dtype,
                         shuffle=shuffle, seed=seed, num_workers=num_workers, cache_dir=cache_dir,
                         num_canonical_nodes=num_canonical_nodes, prefetch_batches=prefetch_batches,
                         prefetch_factor=prefetch_factor, max_ahead=max_ahead, stream_priority=stream_priority)
        self.dali_threads = dali_threads or default_threads()
        # all JPEGs to the hardware decoder (H100/H200): measured on an H200, 1.0 gives 32k img/s with
        # 2.2 cores where 0.9 gives 31k with 3.9 (the rest go to the hybrid decoder, whose Huffman
        # stage runs on DALI's CPU threads); GPUs without the engine decode on CUDA regardless
        self.hw_decoder_load = hw_decoder_load
        # batches DALI decodes ahead: 3 measured faster than DALI's default 2 at 256 px on an H200, 3 rounds each,
        # two calls (8 CUDA queues: 34.9k / 32.7k vs 32.7k / 28.8k img/s; 32 queues: 29.0k vs 26.0k), the same at
        # 512 px within the spread (18.9-19.4k); one more output batch of GPU memory
        self.prefetch_queue_depth = prefetch_queue_depth
        # DALI reads the fed arrays in place instead of copying them (they stay alive in
        # `_Feed.inflight` until the pipeline returns their batch)
        self.no_copy = no_copy
        # stage_inputs: the producer thread copies each batch's JPEGs into one contiguous buffer (pinned
        # on CUDA) before DALI gets them, so the decoder's host stage reads warm, contiguous memory
        # instead of the shard maps' pages. Measured slower on an H200 at 512 px (16.6-17.5k vs 19.1k img/s,
        # bench/results/loaders-*-dali-512-stage.json): off by default, kept so the comparison can be rerun
        self.stage_inputs = stage_inputs
        # decode_crop: the decoder decodes only each sample's crop box (decoders.image_slice) instead of the whole
        # image, then the box is resized and mirrored; single-crop specs only. Measured no faster on an H200
        # (256 px 29.1k vs 32.9k img/s, 512 px 22.8k vs 23.5k; bench/results/loaders-*-decode-crop.json): off by
        # default, kept so the comparison can be rerun
        self.decode_crop = decode_crop
        # hybrid_huffman_threshold (with hw_decoder_load < 1): 0 sends the Huffman stage of the JPEGs the hardware
        # decoder does not take to the GPU instead of DALI's CPU threads (see build_pipeline); None: DALI's default.
        # Measured on an H200 at 256 px (bench/results/loaders-*-2026-11-29-huffman.json, 3 rounds): the GPU's
        # Huffman decoding is slow for such small images (hw 0.9: 15.6k img/s with it vs 31.8k on the CPU threads,
        # which took 5.3 cores; hw 0.75: 7.7k vs 26.4k with 6.2 cores), and all-hardware decoding ran 26.0-32.7k
        # with 3.2-3.7 cores. So the default stays None with hw_decoder_load 1.0; the knob stays for other GPUs
        self.hybrid_huffman_threshold = hybrid_huffman_threshold
        # pipelines: DALI pipelines fed in turn from the one producer thread (batch i to pipeline i mod n, outputs
        # taken in the same turn, so the epoch's order is kept), each with dali_threads threads and its own decoder
        # handle, so one's host-side work overlaps another's decoding. DALI alone decoded 256-px JPEGs on an H200 at
        # 34-40k img/s with one pipeline and 46-57k with two (bench._dali_pipes, a thread per pipeline). In the loader
        # (2 workers, 256 px, all rounds of five calls; loaders-*-2026-11-29-{pipelines,final,pipes-threads*}.json):
        # 1 x 4 threads 31.3k median of 14 rounds at 3.5 cores, 2 x 4 34.1k of 13 at 4.2, 2 x 2 36.7k at 4.1, 2 x 1
        # 32.3k at 3.3 (one round of seven fell to 19.0k); at 512 px no gain (the hardware decoder's bound). Two
        # pipelines cost ~0.7 cores more, past the 4 that 256 px may take here, so the default stays 1. Each pipeline
        # holds its own prefetched outputs (prefetch_queue_depth batches of GPU memory each)
        self.pipelines = pipelines
        self.exec_dynamic = exec_dynamic  # DALI's execution model (see build_pipeline)
        self.dali_stream_policy = stream_policy  # DALI's CUDA streams (see build_pipeline)
        # where the producer thread's time goes, summed over the loader's life (seconds; take differences):
        # feed_wait_s: DALI's source callback waiting for the workers' next encoded batch; run_s: in
        # pipe.run() (that wait included: it feeds the next batch, then waits for this one's outputs);
        # out_s: outputs to torch tensors
        self.timing = {"batches": 0, "feed_wait_s": 0.0, "run_s": 0.0, "out_s": 0.0}
        self._single: Pipeline | None = None  # batch-of-one pipeline that finds undecodable samples
        self._pipes: list = []  # the source pipelines (`pipelines` of them), kept across epochs
        self._feeds: list[_Feed] = []  # their inputs for the current epoch
        half = dtype in (torch.float16, torch.bfloat16) and device.type == "cuda"
        self._out_dtype = torch.float16 if half else torch.float32  # what the pipeline emits

    def _pipeline(self, source=None, batch_size: int | None = None) -> "Pipeline":
        return build_pipeline(
            batch_size=batch_size or self.batch_size, sizes=[spec.size for spec in self.augment.crop_specs()],
            normalize=not isinstance(self.augment, MultiCropSpec), mean=self.augment.mean,
            std=self.augment.std, device=self.device, num_threads=self.dali_threads,
            hw_decoder_load=self.hw_decoder_load,
            prefetch_queue_depth=self.prefetch_queue_depth if source is not None else 1, source=source,
            out_dtype=self._out_dtype, no_copy=self.no_copy and source is not None, exec_dynamic=self.exec_dynamic,
            stream_policy=self.dali_stream_policy, decode_crop=self.decode_crop,
            hybrid_huffman_threshold=self.hybrid_huffman_threshold)

    def _inputs(self, raw: dict[str, Any]) -> list:
        """[jpegs, roi_start_0, roi_end_0, roi_start_1, ...] (with decode_crop: [jpegs, crop_start, crop_end,
        mirror]): the pipeline's inputs for one batch (the images as views into the shard maps or the batch's
        buffer, the crops as [B, 2] arrays)."""
        jpegs = encoded_views(raw, self.maps)
        crops = raw["crops"].numpy()  # [B, crops, 5]
        if self.decode_crop:
            return [jpegs, *crop_box(crops[:, 0])]
        out = [jpegs]
        for k in range(crops.shape[1]):
            out.extend(roi(crops[:, k]))
        return out

    def _named(self, inputs: list[list[np.ndarray]], pick=slice(None)) -> dict[str, list[np.ndarray]]:
        """Inputs by external-source name, for a pipeline built without a source callback."""
        names = input_names((len(inputs) - 1) // 2, self.decode_crop)
        return {n: (v[pick] if isinstance(pick, slice) else v[pick:pick + 1]) for n, v in zip(names, inputs)}

    def _images(self, outputs, raw: dict[str, Any]):
        """Pipeline outputs -> the batch's images (a tensor, or the multi-crop list)."""
        if "params" not in raw:
            return to_torch(outputs[0], self.device, self._out_dtype).to(self.dtype)
        views = [to_torch(o, self.device, torch.uint8) for o in outputs]
        return self.augment.finish(views + [raw["params"].to(self.device)], self.dtype)

    def _salvage(self, raw: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """Decode a batch one sample at a time: (the batch of the samples that decode, [(uid, reason)] of
        the others). (A DALI pipeline is unusable after an error, so each failure costs a rebuild.)"""
        inputs = self._inputs(raw)
        keep, failed = [], []
        for i in range(len(inputs[0])):
            if self._single is None:
                self._single = self._pipeline(batch_size=1)
            try:
                self._single.run(**self._named(inputs, i))
                keep.append(i)
            except Exception as e:
                self._single = None
                failed.append((raw["uid"][i], _reason(e)))
        return (select(raw, keep, self.maps) if failed else raw), failed

    def _source(self, j: int):
        """DALI's batch callback of pipeline j: its next batch of the epoch (replayed ones first; only a replayed
        one can be empty, as the dealer skips the workers' empty batches)."""
        feed = self._feeds[j]
        t = time.perf_counter()
        try:
            while True:
                raw = feed.replay.popleft() if feed.replay else next(feed.batches)  # StopIteration ends the epoch
                if raw["uid"]:
                    break
                feed.carry.extend(raw["failed"])
        finally:
            self.timing["feed_wait_s"] += time.perf_counter() - t
        feed.inflight.append((raw, feed.carry[:]))
        feed.carry.clear()
        inputs = self._inputs(raw)
        if self.stage_inputs:
            inputs[0] = self._staged(raw, inputs[0])
        return inputs

    def _source_of(self, j: int):
        """Pipeline j's callback (no parameters: DALI calls it once per batch)."""
        def source():
            return self._source(j)
        return source

    def _staged(self, raw: dict[str, Any], views: list[np.ndarray]) -> list[np.ndarray]:
        """The views' bytes copied into one buffer (pinned on CUDA; torch's pinned-memory cache reuses it once
        freed), kept alive in `raw` as long as DALI may read it (the batch stays in `_Feed.inflight`)."""
        sizes = [v.size for v in views]
        total = sum(sizes)
        pinned = self.device.type == "cuda"
        buf = torch.empty(max(1, total), dtype=torch.uint8, pin_memory=pinned)
        flat = buf.numpy()
        np.concatenate(views, out=flat[:total])
        raw["staged"] = buf
        ends = np.cumsum(sizes).tolist()
        return [flat[b:e] for b, e in zip([0] + ends[:-1], ends)]

    def _produce(self, batches: Iterator[dict[str, Any]]) -> Iterator[tuple[Any, list[torch.Tensor]]]:
        # The pipelines outlive the epoch (building one costs the decoder's setup); they are
        # dropped only when an epoch is left unfinished, as they then hold prefetched batches.
        # The pipelines take the batches in turn (_Dealer) and give them back in the same turn.
        n = self.pipelines
        dealer = _Dealer(batches, n)
        self._feeds = [_Feed(dealer.stream(j)) for j in range(n)]
        if len(self._pipes) != n:
            self._pipes = [self._pipeline(self._source_of(j)) for j in range(n)]
        finished = False
        try:
            j = 0
            while True:
                try:
                    item = self._next_output(j)
                except StopIteration:
                    self._pipes[j].reset()
                    for k in range(n):  # batches go out in the order they were dealt: the others are at their end
                        if k != j:
                            self._finish_pipeline(k)
                    finished = True
                    break
                yield item
                j = (j + 1) % n
            carry = [f for feed in self._feeds for f in feed.carry] + dealer.carry
            if carry:
                yield (None, carry), []
        finally:
            if not finished:
                self._pipes = []

    def _finish_pipeline(self, k: int) -> None:
        """At the epoch's end: pipeline k must have nothing left (its run() ends the epoch too); then reset it."""
        try:
            self._pipes[k].run()
        except StopIteration:
            self._pipes[k].reset()
            return
        raise RuntimeError(f"DALI pipeline {k} still had a batch at the epoch's end (the turn order was lost)")

    def _next_output(self, j: int) -> tuple[Any, list[torch.Tensor]]:
        """Pipeline j's next batch: ((Batch or None, failed [(uid, reason)]), tensors to keep alive); StopIteration
        at the epoch's end."""
        feed = self._feeds[j]
        try:
            t = time.perf_counter()
            try:
                outputs = self._pipes[j].run()
            finally:
                self.timing["run_s"] += time.perf_counter() - t
            raw, carried = feed.inflight.popleft()
            failed = carried + list(raw["failed"])
        except StopIteration:
            raise
        except Exception as e:
            # Rebuild, find the bad samples of the failed batch, requeue the others. DALI may
            # report a later in-flight batch's failure at this batch's outputs (seen with its
            # legacy executor): when every sample of this one decodes, the others are searched
            # the same way and replayed without their bad samples.
            (raw, carried), rest = feed.inflight.popleft(), list(feed.inflight)
            feed.inflight.clear()
            self._pipes[j] = None
            raw, more = self._salvage(raw)
            if not more:
                cleaned = [(self._salvage(r), fs) for r, fs in rest]
                if not any(bad for (_, bad), _ in cleaned):  # not the data's fault (e.g. out of
                    raise e  # memory): do not hide it
                rest = [(r, fs + bad) for (r, bad), fs in cleaned]
            feed.replay.extendleft(r for r, _ in reversed(rest))
            feed.carry[:0] = [f for _, fs in rest for f in fs]
            self._pipes[j] = self._pipeline(self._source_of(j))
            failed = carried + list(raw["failed"]) + more
            if not raw["uid"]:
                return (None, failed), []
            inputs = self._inputs(raw)
            outputs = self._pipeline(batch_size=len(inputs[0])).run(**self._named(inputs))
        t = time.perf_counter()
        images = self._images(outputs, raw)
        self.timing["out_s"] += time.perf_counter() - t
        self.timing["batches"] += 1
        return ((Batch(images, raw["modality"], raw["source"], raw["uid"]), failed),
                images if isinstance(images, list) else [images])

    def close(self) -> None:
        super().close()
        pipes = bool(self._pipes) or self._single is not None
        self._pipes, self._single = [], None
        if pipes:
            # A dropped pipeline leaves its Python graph (DALI's nodes, operators and external sources
            # reference each other) and the epoch's DataLoader state to the cycle collector; collect them
            # now. In the test suite a DataLoader that forked its workers beside that garbage had a worker
            # segfault (tests: test_dali_close_leaves_no_dali_garbage).
            gc.collect()



def _available(device: torch.device) -> bool:
    return Pipeline is not None and (device.type == "cpu" or torch.cuda.is_available())


register_backend("dali", available=_available)(DaliLoader)
