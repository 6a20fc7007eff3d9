"""Types shared by the readers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class SkipFile(Exception):
    """A file we cannot or should not turn into samples; the message is the manifest's reason."""


@dataclass
class Frame:
    """One 2-D image from a file, already scaled to 8 bits (HxW or HxWx3)."""

    pixels: np.ndarray
    index: int | None  # slice/frame number for the uid; None for single-image files
    meta: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None  # what the file says (DICOM Modality tag); the source's wins
    aspect: float = 1.0  # row spacing / column spacing, corrected to square pixels on resize


@dataclass
class ReadOptions:
    """Run-wide reader options (per-source ones live in SourceSpec)."""

    percentiles: tuple[float, float] = (0.5, 99.5)
    min_std: float = 2.0  # volumes: drop slices whose 8-bit std is below this (empty/near-constant)
    min_foreground: float = 0.02  # volumes: drop slices with less than this fraction of non-background
    max_size: int = 512  # for JPEG draft decoding (decode at a reduced scale when it is enough)
    resize_side: str = "short"


def jsonable(value: Any) -> Any:
    """DICOM/NIfTI header values -> plain JSON types."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    try:
        return [jsonable(v) for v in value]  # pydicom MultiValue
    except TypeError:
        pass
    try:
        return round(float(value), 6)  # pydicom DSfloat / IS
    except (TypeError, ValueError):
        return str(value)
