"""`python -m loaders.ingest SRC [SRC ...] --out DIR [options]` (see --help)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from loaders.shards import MODALITIES

from .core import IngestOptions, ingest
from .scaling import WINDOW_PRESETS
from .sources import SOURCE_KEYS, load_sources_yaml, parse_source

PER_SOURCE_DEFAULTS = ("window", "axis", "stride", "volumes", "modality")

EPILOG = f"""
sources:
  SRC is a folder (walked recursively), a single file, or a .txt/.lst file listing paths
  (relative to the list). Per-source options go after the path as key=value pairs:
    path=/data/lidc,name=lidc,modality=CT,window=lung,axis=axial,stride=2
  keys: {', '.join(SOURCE_KEYS)}. Or put the sources in a YAML file (--sources):
    defaults: {{window: soft_tissue}}
    sources:
      - {{path: /data/lidc, name: lidc, modality: CT, window: lung}}
      - {{path: /data/isic, name: isic, modality: DERM, labels: labels.csv}}
  labels: 'folder' (class = parent folder name) or a CSV 'path,label' (path relative to the
  source, or the file's stem); label=N gives one label to the whole source.

formats: DICOM (.dcm/.dicom/.ima or extensionless with DICM magic), NIfTI (.nii/.nii.gz),
  PNG/TIFF/JPEG/BMP (8- or 16-bit). Files of other types are listed as skipped.

windows (CT in Hounsfield units, center/width): {', '.join(f'{k} {c:g}/{w:g}' for k, (c, w) in WINDOW_PRESETS.items())}.
  auto = the DICOM file's WindowCenter/Width for CT, robust percentiles otherwise;
  file = the file's window for any modality; percentile; or CENTER:WIDTH (e.g. 40:400).

modalities: {', '.join(MODALITIES)} (default: the DICOM Modality tag, else OTHER).

output: OUT/index.json (MDS, read it with streaming.StreamingDataset(local=OUT)),
  OUT/part-NNNNN/ (one per --chunk-size files), OUT/manifest.json (counts per source and
  modality, pixel statistics, options, every skipped file with its reason).
  Rerun the same command after an interruption: finished parts are kept, the rest redone.
  --remote s3://bucket/path also uploads every part, the index and the manifest there.
"""


def build_parser() -> argparse.ArgumentParser:
    d = IngestOptions()
    p = argparse.ArgumentParser(
        prog="python -m loaders.ingest",
        description="Turn medical images (DICOM, NIfTI, PNG/TIFF/JPEG) into MDS shards of 8-bit "
                    "JPEG/PNG samples (the shard-sample contract of loaders/shards.py).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="*", help="source: PATH or path=PATH,key=value,... (see below)")
    p.add_argument("--sources", metavar="YAML", help="YAML file listing sources (added after SRC ones)")
    p.add_argument("--out", required=True, help="output folder (local)")
    p.add_argument("--remote", help="also upload to this object-store URI (s3://, gs://, ...)")
    g = p.add_argument_group("defaults for every source (a source's own key=value wins, then these flags, "
                             "then the YAML's defaults)")
    g.add_argument("--name", help="source name (only with a single SRC; default: folder name)")
    g.add_argument("--modality", choices=MODALITIES, help="modality code (default: DICOM tag, else OTHER)")
    g.add_argument("--window", help=f"intensity window (default {d.window}; see below; write a negative "
                   "center as --window=-600:1500)")
    g.add_argument("--axis", help="NIfTI slicing axis: auto (most slices) | 0 | 1 | 2 | "
                   "sagittal | coronal | axial (default auto)")
    g.add_argument("--stride", type=int, help="NIfTI: keep every N-th slice (default 1)")
    g.add_argument("--volumes", choices=("first", "all"),
                   help="4-D NIfTI: first volume only or all (default first)")
    g = p.add_argument_group("scaling and output")
    g.add_argument("--percentiles", default=f"{d.percentiles[0]:g},{d.percentiles[1]:g}", metavar="LO,HI",
                   help="robust scaling percentiles (default 0.5,99.5)")
    g.add_argument("--min-std", type=float, default=d.min_std,
                   help="NIfTI: drop slices whose 8-bit std is below this (default 2)")
    g.add_argument("--min-foreground", type=float, default=d.min_foreground,
                   help="NIfTI: drop slices where fewer than this fraction of pixels differ from the "
                        "slice median by >10%% of the range (default 0.02)")
    g.add_argument("--max-size", type=int, default=d.max_size,
                   help="resize so the chosen side is at most this (default 512; 0 = keep size)")
    g.add_argument("--resize-side", choices=("short", "long"), default=d.resize_side,
                   help="side limited by --max-size (default short)")
    g.add_argument("--encoding", choices=("jpeg", "png"), default=d.encoding, help="default jpeg (GPU-decodable)")
    g.add_argument("--quality", type=int, default=d.quality, help="JPEG quality (default 95)")
    g.add_argument("--shard-size", default=d.shard_size, help="MDS shard size limit (default 64mb)")
    g = p.add_argument_group("selection (data-size ladder)")
    g.add_argument("--subset", type=int,
                   help="keep N files (not samples) chosen at random; nested across N for one seed")
    g.add_argument("--fraction", type=float, help="keep this fraction of the files")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for --subset/--fraction (default 0)")
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=d.workers, help=f"worker processes (default {d.workers})")
    g.add_argument("--chunk-size", type=int, default=d.chunk_size,
                   help="files per part; the unit of resume (default 256)")
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it holds a different ingest")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sources = [parse_source(s) for s in args.src]
        defaults = {}
        if args.sources:
            more, defaults = load_sources_yaml(args.sources)
            sources += more
        if not sources:
            print("error: give at least one SRC or --sources", file=sys.stderr)
            return 2
        if args.name:
            if len(sources) != 1:
                print("error: --name needs exactly one source; use name= per source", file=sys.stderr)
                return 2
            sources[0].name = args.name
        lo, hi = (float(x) for x in args.percentiles.split(","))
        unknown = set(defaults) - set(PER_SOURCE_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown YAML defaults {sorted(unknown)}; valid: {', '.join(PER_SOURCE_DEFAULTS)}")
        d = IngestOptions()
        per_source = {}
        for key in PER_SOURCE_DEFAULTS:  # flag given > YAML default > built-in default
            flag = getattr(args, key)
            per_source[key] = flag if flag is not None else defaults.get(key, getattr(d, key))
        per_source["axis"] = str(per_source["axis"])
        options = dict(
            max_size=args.max_size, resize_side=args.resize_side, encoding=args.encoding, quality=args.quality,
            percentiles=(lo, hi), min_std=args.min_std,
            min_foreground=args.min_foreground,
            subset=args.subset, fraction=args.fraction, seed=args.seed, chunk_size=args.chunk_size,
            shard_size=args.shard_size, workers=args.workers, remote=args.remote, overwrite=args.overwrite,
            progress=not args.quiet,
        )
        manifest = ingest(sources, args.out, **options, **per_source)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("samples", "by_modality", "files", "seconds")}
    print(json.dumps(summary, indent=1))
    print(f"shards: {manifest['out']}  manifest: {os.path.join(manifest['out'], 'manifest.json')}"
          + (f"  ({len(manifest['skipped'])} skipped files listed there)" if manifest["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
