"""What to ingest: sources (a folder, a file, or a list of files) with their options,
from the command line (`PATH` or `path=PATH,name=...,modality=...`) or a YAML file."""
from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from loaders.shards import MODALITIES

from .scaling import parse_window

DICOM_EXTS = (".dcm", ".dicom", ".dic", ".ima")
NIFTI_EXTS = (".nii", ".nii.gz")
RASTER_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LIST_EXTS = (".txt", ".lst", ".list")


def file_kind(path: str) -> str | None:
    """'dicom' | 'nifti' | 'raster' by extension; extensionless files are DICOM when they
    carry the 'DICM' magic (many PACS exports have no extension). None: not ours."""
    low = path.lower()
    if low.endswith(NIFTI_EXTS):
        return "nifti"
    if low.endswith(DICOM_EXTS):
        return "dicom"
    if low.endswith(RASTER_EXTS):
        return "raster"
    if "." not in os.path.basename(low):
        try:
            with open(path, "rb") as f:
                head = f.read(132)
            if head[128:132] == b"DICM":
                return "dicom"
        except OSError:
            return None
    return None


@dataclass
class SourceSpec:
    """One data set. Unset fields (None) take the run's defaults."""

    path: str
    name: str | None = None
    modality: str | None = None  # None: from the DICOM Modality tag, else OTHER (NIfTI: MR)
    window: str | None = None  # auto | file | percentile | lung | soft_tissue | bone | brain | wide | C:W
    axis: str | None = None  # NIfTI slicing axis: auto | 0 | 1 | 2 | sagittal | coronal | axial
    stride: int | None = None  # NIfTI: keep every stride-th slice
    volumes: str | None = None  # 4-D NIfTI: first | all
    labels: str | None = None  # 'folder' (parent folder name) or a CSV file 'path,label'
    label: int | None = None  # one label for the whole source

    def __post_init__(self) -> None:
        if self.modality is not None:
            self.modality = self.modality.upper()
            if self.modality not in MODALITIES:
                raise ValueError(f"unknown modality {self.modality!r}; valid: {', '.join(MODALITIES)}")
        if self.window is not None:
            parse_window(self.window)
        if self.axis is not None and str(self.axis).lower() not in AXES:
            raise ValueError(f"unknown axis {self.axis!r}; valid: {', '.join(AXES)}")
        if self.stride is not None:
            self.stride = int(self.stride)
            if self.stride < 1:
                raise ValueError("stride must be >= 1")
        if self.volumes is not None and self.volumes not in ("first", "all"):
            raise ValueError(f"volumes must be 'first' or 'all', got {self.volumes!r}")
        if self.label is not None:
            self.label = int(self.label)
        if self.name is None:
            base = os.path.basename(os.path.normpath(self.path))
            for ext in (*NIFTI_EXTS, *DICOM_EXTS, *RASTER_EXTS, *LIST_EXTS):
                if base.lower().endswith(ext):
                    base = base[: -len(ext)]
                    break
            self.name = base or "source"
        if "/" in self.name or "#" in self.name:
            raise ValueError(f"source name may not contain '/' or '#': {self.name!r}")

    def resolved(self, defaults: dict[str, Any]) -> "SourceSpec":
        """A copy with unset per-source options taken from the run-wide defaults."""
        values = dataclasses.asdict(self)
        values["path"] = os.path.abspath(os.path.expanduser(self.path))
        for key in ("window", "axis", "stride", "volumes"):
            if values[key] is None:
                values[key] = defaults[key]
        if values["modality"] is None and defaults.get("modality"):
            values["modality"] = defaults["modality"]
        return SourceSpec(**values)


AXES = ("auto", "0", "1", "2", "sagittal", "coronal", "axial")
SOURCE_KEYS = tuple(f.name for f in dataclasses.fields(SourceSpec))


def parse_source(text: str) -> SourceSpec:
    """'PATH' or 'path=PATH,name=lidc,modality=CT,window=lung' (keys: SourceSpec fields)."""
    if "=" not in text.split(",", 1)[0]:
        return SourceSpec(path=text)
    values: dict[str, Any] = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"source option {item!r} is not key=value (in {text!r})")
        key, val = item.split("=", 1)
        key = key.strip()
        if key not in SOURCE_KEYS:
            raise ValueError(f"unknown source option {key!r}; valid: {', '.join(SOURCE_KEYS)}")
        values[key] = val.strip()
    if "path" not in values:
        raise ValueError(f"source {text!r} has no path=")
    return SourceSpec(**values)


def load_sources_yaml(path: str) -> tuple[list[SourceSpec], dict[str, Any]]:
    """YAML: either a list of sources or {defaults: {...}, sources: [...]}; each source a
    mapping of SourceSpec fields or a bare path. Relative paths are relative to the YAML file."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f)
    defaults: dict[str, Any] = {}
    if isinstance(doc, dict):
        unknown = set(doc) - {"sources", "defaults"}
        if unknown:
            raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; valid: sources, defaults")
        defaults = dict(doc.get("defaults") or {})
        items = doc.get("sources") or []
    elif isinstance(doc, list):
        items = doc
    else:
        raise ValueError(f"{path}: expected a list of sources or a mapping with 'sources'")
    base = os.path.dirname(os.path.abspath(path))
    specs = []
    for item in items:
        if isinstance(item, str):
            item = {"path": item}
        unknown = set(item) - set(SOURCE_KEYS)
        if unknown:
            raise ValueError(f"{path}: unknown source keys {sorted(unknown)}; valid: {', '.join(SOURCE_KEYS)}")
        item = dict(item)
        item["path"] = os.path.join(base, os.path.expanduser(str(item["path"])))
        specs.append(SourceSpec(**item))
    return specs, defaults


def list_files(spec: SourceSpec) -> tuple[str, list[tuple[str, str]]]:
    """(root, [(abspath, relpath)]) sorted by relpath. A folder is walked recursively
    (hidden entries skipped); a .txt/.lst file lists paths one per line (relative to it)."""
    path = os.path.abspath(os.path.expanduser(spec.path))
    if os.path.isdir(path):
        root = path
        found = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                if not fn.startswith("."):
                    found.append(os.path.join(dirpath, fn))
    elif os.path.isfile(path) and path.lower().endswith(LIST_EXTS):
        root = os.path.dirname(path)
        with open(path) as f:
            lines = [ln.strip() for ln in f]
        found = [os.path.join(root, ln) for ln in lines if ln and not ln.startswith("#")]
    elif os.path.exists(path):
        root = os.path.dirname(path)
        found = [path]
    else:
        raise FileNotFoundError(f"source {spec.name!r}: {spec.path} does not exist")
    pairs = [(os.path.abspath(p), os.path.relpath(p, root).replace(os.sep, "/")) for p in found]
    pairs.sort(key=lambda t: t[1])
    return root, pairs


def label_map(spec: SourceSpec, root: str, relpaths: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(relpath -> label, class name -> label). Empty when the source has no labels."""
    if spec.labels is None:
        if spec.label is not None:
            return {r: spec.label for r in relpaths}, {}
        return {}, {}
    if spec.labels == "folder":
        names = sorted({os.path.dirname(r).split("/")[-1] for r in relpaths if "/" in r})
        classes = {n: i for i, n in enumerate(names)}
        return {r: classes[os.path.dirname(r).split("/")[-1]] for r in relpaths if "/" in r}, classes
    csv_path = spec.labels if os.path.isabs(spec.labels) else os.path.join(root, spec.labels)
    with open(csv_path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and not row[0].startswith("#")]
    if rows and rows[0][:2] == ["path", "label"]:
        rows = rows[1:]
    raw = {r[0].strip(): r[1].strip() for r in rows}
    if all(v.lstrip("-").isdigit() for v in raw.values()):
        return {k: int(v) for k, v in raw.items()}, {}
    classes = {n: i for i, n in enumerate(sorted(set(raw.values())))}
    return {k: classes[v] for k, v in raw.items()}, classes
