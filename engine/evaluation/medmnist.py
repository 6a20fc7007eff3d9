"""The 12 MedMNIST 2D tasks and their official `.npz` files, read from a local folder.

A file holds `train_images`, `train_labels`, `val_*`, `test_*`; images are uint8 `[N, H, W]`
(grayscale) or `[N, H, W, 3]`, labels `[N, 1]` class indices or `[N, 14]` binary labels for
chestmnist (multi-label). The 28 px release is named `<task>.npz`, the larger ones
(MedMNIST+) `<task>_<size>.npz`. Nothing is downloaded here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
DOWNLOAD_HINT = "get them from https://zenodo.org/records/10519652 (MedMNIST v2 / MedMNIST+)"


@dataclass(frozen=True)
class TaskInfo:
    name: str
    num_classes: int  # classes, or labels for multi-label
    multilabel: bool
    channels: int
    splits: tuple[int, int, int]  # official train / val / test sizes


TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo("pathmnist", 9, False, 3, (89_996, 10_004, 7_180)),
        TaskInfo("chestmnist", 14, True, 1, (78_468, 11_219, 22_433)),
        TaskInfo("dermamnist", 7, False, 3, (7_007, 1_003, 2_005)),
        TaskInfo("octmnist", 4, False, 1, (97_477, 10_832, 1_000)),
        TaskInfo("pneumoniamnist", 2, False, 1, (4_708, 524, 624)),
        TaskInfo("retinamnist", 5, False, 3, (1_080, 120, 400)),
        TaskInfo("breastmnist", 2, False, 1, (546, 78, 156)),
        TaskInfo("bloodmnist", 8, False, 3, (11_959, 1_712, 3_421)),
        TaskInfo("tissuemnist", 8, False, 1, (165_466, 23_640, 47_280)),
        TaskInfo("organamnist", 11, False, 1, (34_561, 6_491, 17_778)),
        TaskInfo("organcmnist", 11, False, 1, (12_975, 2_392, 8_216)),
        TaskInfo("organsmnist", 11, False, 1, (13_932, 2_452, 8_827)),
    )
}
ALL_TASKS = tuple(TASKS)


class MissingDataError(FileNotFoundError):
    """Raised before any work starts, naming every file that is missing."""


@dataclass
class TaskData:
    info: TaskInfo
    path: Path
    size: int  # side length of the stored images
    images: dict[str, np.ndarray]  # split -> uint8 [N, H, W] or [N, H, W, C]; empty if not loaded
    labels: dict[str, np.ndarray]  # split -> int64 [N] (multi-class) or float32 [N, L] (multi-label)


def candidate_files(data_dir: Path, task: str) -> dict[int, Path]:
    """Files of `task` present in `data_dir`, by image size."""
    found: dict[int, Path] = {}
    plain = data_dir / f"{task}.npz"
    if plain.is_file():
        found[28] = plain
    for p in data_dir.glob(f"{task}_*.npz"):
        m = re.fullmatch(rf"{re.escape(task)}_(\d+)\.npz", p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def find_task_file(data_dir: str | Path, task: str, size: int | str = "auto") -> tuple[Path, int]:
    """The file for one task: `size="auto"` takes the largest size present."""
    data_dir = Path(data_dir)
    found = candidate_files(data_dir, task)
    if size == "auto":
        if not found:
            raise MissingDataError(missing_message(data_dir, [task], size))
        best = max(found)
        return found[best], best
    size = int(size)
    if size not in found:
        raise MissingDataError(missing_message(data_dir, [task], size))
    return found[size], size


def expected_names(task: str, size: int | str) -> str:
    if size == "auto":
        return f"{task}.npz or {task}_{{64,128,224}}.npz"
    return f"{task}.npz (or {task}_28.npz)" if int(size) == 28 else f"{task}_{int(size)}.npz"


def missing_message(data_dir: Path, tasks: list[str], size: int | str) -> str:
    names = ", ".join(expected_names(t, size) for t in tasks)
    return (
        f"MedMNIST files missing in {data_dir}: {names}. "
        f"Put the official .npz files there ({DOWNLOAD_HINT}); nothing is downloaded at run time."
    )


def check_available(data_dir: str | Path, tasks: list[str], size: int | str = "auto") -> dict[str, tuple[Path, int]]:
    """Resolve every task's file up front so a missing one fails before any feature work."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise MissingDataError(f"MedMNIST data folder {data_dir} does not exist; "
                               + missing_message(data_dir, tasks, size))
    out, missing = {}, []
    for task in tasks:
        try:
            out[task] = find_task_file(data_dir, task, size)
        except MissingDataError:
            missing.append(task)
    if missing:
        raise MissingDataError(missing_message(data_dir, missing, size))
    return out


def task_info(task: str, labels: dict[str, np.ndarray], channels: int = 0) -> TaskInfo:
    """Known tasks come from the table; any other file in the same layout is described from its labels."""
    if task in TASKS:
        return TASKS[task]
    lab = labels["train"]
    multilabel = lab.ndim == 2 and lab.shape[1] > 1
    num = lab.shape[1] if multilabel else int(max(int(v.max()) for v in labels.values() if v.size) + 1)
    return TaskInfo(task, num, multilabel, channels, tuple(len(labels[s]) for s in SPLITS))  # type: ignore[arg-type]


def _check_keys(path: Path, npz) -> None:
    need = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    absent = [k for k in need if k not in npz.files]
    if absent:
        raise KeyError(f"{path} lacks arrays {absent} (has {sorted(npz.files)}); expected the official MedMNIST layout")


def load_images(path: str | Path, split: str, expected: int | None = None) -> np.ndarray:
    """One split's uint8 images; `.npz` members are read one at a time, so this reads only them."""
    path = Path(path)
    with np.load(path) as npz:
        _check_keys(path, npz)
        images = np.ascontiguousarray(npz[f"{split}_images"])
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"{path}: {split}_images must be uint8 [N,H,W] or [N,H,W,C], "
                         f"got {images.dtype} {images.shape}")
    if expected is not None and len(images) != expected:
        raise ValueError(f"{path}: {split} has {len(images)} images but {expected} labels")
    return images


def load_task(data_dir: str | Path, task: str, size: int | str = "auto", with_images: bool = True) -> TaskData:
    """Labels of the three splits, and their images unless `with_images=False` (features cached)."""
    path, found_size = find_task_file(data_dir, task, size)
    with np.load(path) as npz:
        _check_keys(path, npz)
        raw = {s: np.asarray(npz[f"{s}_labels"]) for s in SPLITS}
    images = {s: load_images(path, s, len(raw[s])) for s in SPLITS} if with_images else {}
    channels = 0
    if images:
        channels = 3 if images["train"].ndim == 4 else 1
    info = task_info(task, raw, channels)
    labels = {}
    for s in SPLITS:
        lab = raw[s].reshape(len(raw[s]), -1)
        labels[s] = lab.astype(np.float32) if info.multilabel else lab[:, 0].astype(np.int64)
    return TaskData(info, path, found_size, images, labels)


def subsample(n: int, limit: int | None, seed: int = 0) -> np.ndarray | None:
    """Sorted indices of a fixed random subset of `limit` out of `n`, or None for all."""
    if limit is None or limit >= n:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))
