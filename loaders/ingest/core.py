"""The ingestion run: list files, read them in worker processes, write MDS shards in
numbered parts (one per chunk of files, with a done-marker), merge the index, write the
manifest.

Why parts: a part is finished and marked done atomically, so a rerun after a crash skips
the done parts, deletes the half-written one and redoes only that. Results come back from
the workers in input order (`imap` over the sorted task list), so the same inputs give the
same shards byte for byte, however many workers run.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from loaders.shards import ENCODINGS, ShardWriter, make_sample, make_uid

from .common import ReadOptions, SkipFile
from .scaling import WINDOW_MODES, parse_window, resize
from .sources import SourceSpec, file_kind, label_map, list_files, parse_source

MANIFEST = "manifest.json"
STATE = "ingest_state.json"
DONE_DIR = "done"  # done/part-NNNNN.json: a part's tallies, written after its shards
KILL_HOOK_ENV = "LOADERS_INGEST_KILL_AFTER"  # tests: SIGKILL ourselves after N samples written
CRASH_HOOK_ENV = "LOADERS_INGEST_CRASH_ON"  # tests: a worker SIGKILLs itself on files whose path has this


@dataclass
class IngestOptions:
    max_size: int = 512
    resize_side: str = "short"  # short | long
    encoding: str = "jpeg"  # jpeg | png
    quality: int = 95
    window: str = "auto"
    axis: str = "auto"
    stride: int = 1
    volumes: str = "first"
    modality: str | None = None  # default modality for sources that name none
    percentiles: tuple[float, float] = (0.5, 99.5)
    min_std: float = 2.0
    min_foreground: float = 0.02
    subset: int | None = None
    fraction: float | None = None
    seed: int = 0
    chunk_size: int = 256
    shard_size: str = "64mb"
    workers: int = max(1, (os.cpu_count() or 1))
    remote: str | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.percentiles = tuple(float(p) for p in self.percentiles)  # type: ignore[assignment]
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {self.percentiles}")
        if self.resize_side not in ("short", "long"):
            raise ValueError(f"resize_side must be 'short' or 'long', got {self.resize_side!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r}; valid: {', '.join(ENCODINGS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError("quality must be in 1..100")
        parse_window(self.window)
        if self.subset is not None and self.fraction is not None:
            raise ValueError("give --subset or --fraction, not both")
        if self.subset is not None and self.subset < 0:
            raise ValueError("subset must be >= 0")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.workers = max(1, int(self.workers))

    def output_affecting(self) -> dict[str, Any]:
        """Options that change the shards (a resume must use the same ones)."""
        d = dataclasses.asdict(self)
        for key in ("workers", "overwrite", "progress", "remote"):
            d.pop(key)
        d["percentiles"] = list(self.percentiles)
        return d


@dataclass(frozen=True)
class Task:
    source: int  # index into the resolved sources
    path: str
    relpath: str
    kind: str | None
    label: int


# --------------------------------------------------------------------------- workers

_LEVELS = np.arange(256, dtype=np.float64) / 255.0  # pixel statistics in [0, 1] units
_LEVELS_SQ = _LEVELS * _LEVELS

_SOURCES: list[SourceSpec] = []
_OPTS: IngestOptions | None = None


def _init_worker(sources: list[SourceSpec], opts: IngestOptions) -> None:
    global _SOURCES, _OPTS
    _SOURCES, _OPTS = sources, opts
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the parent dies (e.g. kill -9 of the
    run), instead of leaving it blocked forever on the pool's task queue."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def _frames(task: Task, spec: SourceSpec, opts: IngestOptions):
    ro = ReadOptions(percentiles=opts.percentiles, min_std=opts.min_std, min_foreground=opts.min_foreground,
                     max_size=opts.max_size,
                     resize_side=opts.resize_side)
    if task.kind == "dicom":
        from .dicom import read_dicom

        return list(read_dicom(task.path, spec.window, ro, spec.modality))
    if task.kind == "nifti":
        from .nifti import read_nifti

        return list(read_nifti(task.path, spec.window, spec.axis, spec.stride, spec.volumes, ro, spec.modality))
    if task.kind == "raster":
        from .raster import read_raster

        return list(read_raster(task.path, ro))
    raise SkipFile("unsupported file type")


def process_file(task: Task, spec: SourceSpec, opts: IngestOptions) -> dict[str, Any]:
    """Read one file into contract samples. Never raises: failures become a skip reason."""
    try:
        if os.path.getsize(task.path) == 0:
            raise SkipFile("empty file")
        with warnings.catch_warnings(record=True) as caught:  # keep library warnings off the
            warnings.simplefilter("always")  # progress bar; the first few go into meta
            frames = _frames(task, spec, opts)
        notes = list(dict.fromkeys(str(w.message)[:200] for w in caught))[:3]
        samples, stats = [], []
        for fr in frames:
            pixels = resize(fr.pixels, opts.max_size, opts.resize_side, fr.aspect)
            modality = spec.modality or fr.modality or "OTHER"
            meta = {**fr.meta, "relpath": task.relpath}
            if notes:
                meta["warnings"] = notes
            if pixels.shape[:2] != fr.pixels.shape[:2]:
                meta["resized_from"] = [int(fr.pixels.shape[0]), int(fr.pixels.shape[1])]
            sample = make_sample(
                pixels, modality=modality, source=spec.name, uid=make_uid(spec.name, task.relpath, fr.index),
                label=task.label, meta=meta, encoding=opts.encoding, quality=opts.quality,
            )
            samples.append(sample)
            flat = pixels.reshape(-1)
            flat = flat[:: max(1, flat.size // 65536)]  # an estimate from <= ~65k pixels per sample is plenty
            hist = np.bincount(flat, minlength=256)
            stats.append((modality, flat.size, float(hist @ _LEVELS), float(hist @ _LEVELS_SQ)))
        return {"samples": samples, "stats": stats, "skip": None}
    except SkipFile as e:
        return {"samples": [], "stats": [], "skip": str(e)}
    except MemoryError:
        return {"samples": [], "stats": [], "skip": "out of memory while reading"}
    except Exception as e:  # never stop the run on one bad file
        return {"samples": [], "stats": [], "skip": f"{type(e).__name__}: {e}"}


def _work(task: Task) -> dict[str, Any]:
    assert _OPTS is not None
    crash_on = os.environ.get(CRASH_HOOK_ENV)
    if crash_on and crash_on in task.relpath:
        os.kill(os.getpid(), signal.SIGKILL)  # tests: a decoder crash or the OOM killer
    return process_file(task, _SOURCES[task.source], _OPTS)


class _OrderedPool:
    """Worker processes returning results in input order, surviving a worker that dies
    (a segfault in a decoder, the OOM killer on a huge file): the files that were in
    flight are retried one at a time, and the one that kills its worker again is skipped."""

    def __init__(self, workers: int, specs: list[SourceSpec], opts: IngestOptions) -> None:
        self.workers, self.specs, self.opts = workers, specs, opts
        self.ahead = 4 * workers  # tasks in flight: enough to keep workers busy, bounded memory
        self._start()

    def _start(self) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.ex = ProcessPoolExecutor(self.workers, mp_context=mp.get_context(), initializer=_init_worker,
                                      initargs=(self.specs, self.opts))

    def _restart(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)
        self._start()

    def _alone(self, task: Task) -> dict[str, Any]:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self.ex.submit(_work, task).result()
        except BrokenProcessPool:
            self._restart()
            return {"samples": [], "stats": [], "skip": "worker process died reading this file "
                                                         "(decoder crash or out of memory)"}

    def results(self, tasks: list[Task]) -> Iterator[dict[str, Any]]:
        from collections import deque
        from concurrent.futures.process import BrokenProcessPool

        queue = iter(tasks)
        window: deque = deque()

        def fill() -> None:
            while len(window) < self.ahead:
                task = next(queue, None)
                if task is None:
                    return
                try:
                    fut = self.ex.submit(_work, task)
                except BrokenProcessPool:  # a worker died since the last result we looked at
                    window.append((task, None))
                    return
                window.append((task, fut))

        fill()
        while window:
            task, fut = window.popleft()
            try:
                if fut is None:
                    raise BrokenProcessPool("pool broken before submit")
                res = fut.result()
            except BrokenProcessPool:
                in_flight = [task] + [t for t, _ in window]
                window.clear()
                self._restart()
                for t in in_flight:  # one at a time: only the culprit is lost
                    yield self._alone(t)
                fill()
                continue
            yield res
            fill()

    def close(self, wait: bool) -> None:
        self.ex.shutdown(wait=wait, cancel_futures=True)


# --------------------------------------------------------------------------- planning


def _as_spec(src: Any) -> SourceSpec:
    if isinstance(src, SourceSpec):
        return src
    if isinstance(src, dict):
        return SourceSpec(**src)
    if isinstance(src, (str, os.PathLike)):
        return parse_source(os.fspath(src))
    raise TypeError(f"a source is a path, a dict of SourceSpec fields or a SourceSpec, got {type(src).__name__}")


def plan(sources: Iterable[Any], opts: IngestOptions) -> tuple[list[SourceSpec], list[Task], list[dict], dict]:
    """Resolve sources, list and sort their files, pick the subset. Returns
    (sources, selected tasks, per-source info, selection summary)."""
    defaults = {"window": opts.window, "axis": opts.axis, "stride": opts.stride, "volumes": opts.volumes,
                "modality": opts.modality}
    specs = [_as_spec(s).resolved(defaults) for s in sources]
    if not specs:
        raise ValueError("no sources given")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"source names must be unique (they prefix the uids); repeated: {dup}")
    tasks: list[Task] = []
    info = []
    for i, spec in enumerate(specs):
        root, pairs = list_files(spec)
        seen = set()
        pairs = [p for p in pairs if not (p[1] in seen or seen.add(p[1]))]
        labels, classes = label_map(spec, root, [r for _, r in pairs])
        for path, rel in pairs:
            stem = os.path.basename(rel).split(".")[0]
            label = labels.get(rel, labels.get(stem, -1))
            tasks.append(Task(i, path, rel, file_kind(path), int(label)))
        info.append({**dataclasses.asdict(spec), "root": root, "files_found": len(pairs),
                     **({"classes": classes} if classes else {})})
    n_all = len(tasks)
    n_keep = n_all
    if opts.subset is not None:
        n_keep = min(opts.subset, n_all)
    elif opts.fraction is not None:
        n_keep = int(round(opts.fraction * n_all))
    if n_keep < n_all:
        # A seeded permutation, first n_keep kept: subsets of one seed are nested
        # (the 0.2M set is inside the 1M set), then back to the sorted order.
        order = list(range(n_all))
        random.Random(opts.seed).shuffle(order)
        tasks = [tasks[i] for i in sorted(order[:n_keep])]
    for i, s in enumerate(info):
        s["files_selected"] = sum(1 for t in tasks if t.source == i)
    selection = {"files_found": n_all, "files_selected": len(tasks), "subset": opts.subset,
                 "fraction": opts.fraction, "seed": opts.seed}
    return specs, tasks, info, selection


def _fingerprint(specs: list[SourceSpec], tasks: list[Task], opts: IngestOptions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(opts.output_affecting(), sort_keys=True).encode())
    h.update(json.dumps([dataclasses.asdict(s) for s in specs], sort_keys=True).encode())
    for t in tasks:
        h.update(f"{t.source}\0{t.relpath}\0{t.label}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


def _part_name(i: int) -> str:
    return f"part-{i:05d}"


def _done_path(out: str, i: int) -> str:
    return os.path.join(out, DONE_DIR, f"{_part_name(i)}.json")


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one


def _prepare_out(out: str, fingerprint: str, opts: IngestOptions) -> None:
    state_path = os.path.join(out, STATE)
    if os.path.isdir(out) and os.listdir(out):
        same = False
        if os.path.exists(state_path):
            with open(state_path) as f:
                same = json.load(f).get("fingerprint") == fingerprint
        if not same:
            if not opts.overwrite:
                raise FileExistsError(
                    f"{out} is not empty and holds no ingest of these inputs with these options; "
                    "pass overwrite=True (--overwrite) to replace it, or choose another output folder")
            shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(state_path):
        _write_json(state_path, {"fingerprint": fingerprint, "options": opts.output_affecting()})


class _Totals:
    """Per-chunk tallies, kept in the chunk's done-marker and summed into the manifest."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.files_ok: dict[str, int] = defaultdict(int)
        self.pixels: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0, 0.0]))
        self.skipped: list[dict[str, str]] = []

    def add(self, source: str, relpath: str, res: dict[str, Any]) -> None:
        if res["skip"] is not None:
            self.skipped.append({"source": source, "path": relpath, "reason": res["skip"]})
            return
        self.files_ok[source] += 1
        for modality, n, s, ss in res["stats"]:
            self.counts[source][modality] += 1
            acc = self.pixels[source][modality]
            acc[0] += n
            acc[1] += s
            acc[2] += ss

    def to_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "files_ok": self.files_ok, "pixels": self.pixels, "skipped": self.skipped}


def _preload(kinds: set) -> None:
    """Import the writer and the readers' libraries once, before the workers fork, rather
    than in every worker (streaming alone takes seconds: it imports transformers)."""
    import streaming  # noqa: F401

    if "dicom" in kinds:
        import pydicom.pixels  # noqa: F401
    if "nifti" in kinds:
        import nibabel  # noqa: F401


def _kill_hook() -> int | None:
    value = os.environ.get(KILL_HOOK_ENV)
    return int(value) if value else None


def ingest(sources: Iterable[Any], out: str, **options: Any) -> dict[str, Any]:
    """Ingest `sources` into MDS shards under `out`; returns the manifest (also written to
    `out/manifest.json`). A source is a path (folder, single file, or .txt list of files),
    a 'path=...,name=...,modality=...' string, a dict of `SourceSpec` fields, or a SourceSpec.
    Options are the `IngestOptions` fields (the CLI flags with underscores). Rerunning with
    the same inputs and options resumes an interrupted run; a finished run is left as is.
    """
    opts = IngestOptions(**options)
    t_start = time.perf_counter()
    specs, tasks, source_info, selection = plan(sources, opts)
    out = os.path.abspath(os.path.expanduser(out))
    fingerprint = _fingerprint(specs, tasks, opts)
    _prepare_out(out, fingerprint, opts)

    chunks = [tasks[i: i + opts.chunk_size] for i in range(0, len(tasks), opts.chunk_size)]
    os.makedirs(os.path.join(out, DONE_DIR), exist_ok=True)
    done = [os.path.exists(_done_path(out, i)) for i in range(len(chunks))]
    pending = [i for i, d in enumerate(done) if not d]
    for i in pending:  # half-written parts from an interrupted run
        shutil.rmtree(os.path.join(out, _part_name(i)), ignore_errors=True)
    todo = [t for i in pending for t in chunks[i]]
    resumed = len(pending) < len(chunks)

    kill_after = _kill_hook()
    written = n_skipped = 0
    if todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="file", desc="ingest", disable=not opts.progress, file=sys.stderr,
                   dynamic_ncols=True)
        workers = min(opts.workers, len(todo))
        _preload({t.kind for t in todo})
        pool = None
        if workers > 1:
            pool = _OrderedPool(workers, specs, opts)
            results = pool.results(todo)
        else:
            results = (process_file(t, specs[t.source], opts) for t in todo)
        try:
            for ci in pending:
                part = os.path.join(out, _part_name(ci))
                target = (part, f"{opts.remote.rstrip('/')}/{_part_name(ci)}") if opts.remote else part
                totals = _Totals()
                with ShardWriter(target, size_limit=opts.shard_size) as writer:
                    for task in chunks[ci]:
                        res = next(results)
                        name = specs[task.source].name
                        for sample in res["samples"]:
                            writer.write(sample)
                            written += 1
                            if kill_after is not None and written >= kill_after:
                                os.kill(os.getpid(), signal.SIGKILL)
                        totals.add(name, task.relpath, res)
                        bar.update(1)
                        n_skipped += res["skip"] is not None
                        bar.set_postfix(samples=written, skipped=n_skipped, refresh=False)
                _write_json(_done_path(out, ci), {"files": len(chunks[ci]), **totals.to_json()})
        except BaseException:
            if pool is not None:
                pool.close(wait=False)
            raise
        finally:
            bar.close()
        if pool is not None:
            pool.close(wait=True)  # reap the workers (their CPU time then counts in getrusage)

    return _finish(out, specs, chunks, source_info, selection, opts, resumed, time.perf_counter() - t_start)


def _finish(out: str, specs: list[SourceSpec], chunks: list[list[Task]], source_info: list[dict],
            selection: dict, opts: IngestOptions, resumed: bool, seconds: float) -> dict[str, Any]:
    from streaming.base.util import merge_index

    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    files_ok: dict[str, int] = defaultdict(int)
    pixels: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0, 0.0]))
    skipped: list[dict[str, str]] = []
    index_files = []
    for ci in range(len(chunks)):
        with open(_done_path(out, ci)) as f:
            d = json.load(f)
        for src, by_mod in d["counts"].items():
            for mod, n in by_mod.items():
                counts[src][mod] += n
        for src, n in d["files_ok"].items():
            files_ok[src] += n
        for src, by_mod in d["pixels"].items():
            for mod, (n, s, ss) in by_mod.items():
                acc = pixels[src][mod]
                acc[0] += n
                acc[1] += s
                acc[2] += ss
        skipped.extend(d["skipped"])
        local_index = os.path.join(out, _part_name(ci), "index.json")
        # With a remote, MDSWriter removes the local part after uploading it: merge_index
        # then fetches each part's index.json from the remote.
        index_files.append((local_index, f"{opts.remote.rstrip('/')}/{_part_name(ci)}/index.json")
                           if opts.remote else local_index)

    target = (out, opts.remote) if opts.remote else out
    merged = os.path.join(out, "index.json")
    if os.path.exists(merged):  # merge_index will not overwrite it (a rerun of a finished job)
        os.remove(merged)
    if index_files:
        import logging

        logging.getLogger("streaming").setLevel(logging.ERROR)  # merge_index warns about its temp dir
        prev = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            merge_index(index_files, target)
        finally:
            logging.getLogger().setLevel(prev)
    else:  # nothing selected: an empty but valid index
        _write_json(os.path.join(out, "index.json"), {"version": 2, "shards": []})

    def stat(n: float, s: float, ss: float) -> dict[str, float]:
        mean = s / n if n else 0.0
        return {"mean": round(mean, 6), "std": round(max(ss / n - mean * mean, 0.0) ** 0.5, 6) if n else 0.0,
                "pixels": int(n)}

    by_modality: dict[str, int] = defaultdict(int)
    mod_pix: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for src in counts:
        for mod, n in counts[src].items():
            by_modality[mod] += n
            for k in range(3):
                mod_pix[mod][k] += pixels[src][mod][k]
    manifest = {
        "format": "loaders.ingest/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "out": out,
        "remote": opts.remote,
        "samples": int(sum(by_modality.values())),
        "counts": {src: dict(sorted(m.items())) for src, m in sorted(counts.items())},
        "by_modality": dict(sorted(by_modality.items())),
        "files": {
            "selected": selection["files_selected"],
            "ingested": int(sum(files_ok.values())),
            "skipped": len(skipped),
            "per_source_ingested": dict(sorted(files_ok.items())),
        },
        "pixel_stats": {
            "note": "mean/std of the written 8-bit pixels scaled to [0, 1], all channels together, "
                    "estimated from up to ~65k evenly spaced pixels per sample",
            "by_modality": {m: stat(*v) for m, v in sorted(mod_pix.items())},
            "by_source": {src: {m: stat(*v) for m, v in sorted(by.items())} for src, by in sorted(pixels.items())},
        },
        "selection": selection,
        "sources": source_info,
        "options": {**opts.output_affecting(), "workers": opts.workers},
        "parts": len(chunks),
        "resumed": resumed,
        "seconds": round(seconds, 3),
        "skipped": skipped,
    }
    _write_json(os.path.join(out, MANIFEST), manifest)
    if opts.remote:
        from streaming.base.storage.upload import CloudUploader

        CloudUploader.get((out, opts.remote), exist_ok=True, keep_local=True).upload_file(MANIFEST)
    return manifest


__all__ = ["IngestOptions", "SourceSpec", "Task", "WINDOW_MODES", "ingest", "plan", "process_file"]
