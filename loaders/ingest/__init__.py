"""Medical files -> MDS shards following the shard-sample contract (loaders/shards.py).

    from loaders.ingest import ingest
    manifest = ingest(["path=/data/lidc,name=lidc,modality=CT,window=lung",
                       {"path": "/data/isic", "name": "isic", "modality": "DERM"}], "shards/mix")

Same as `python -m loaders.ingest ... --out shards/mix` (see `--help`).
"""
from .common import Frame, SkipFile
from .core import IngestOptions, ingest, plan, process_file
from .scaling import WINDOW_PRESETS
from .sources import SourceSpec, load_sources_yaml, parse_source

__all__ = ["Frame", "IngestOptions", "SkipFile", "SourceSpec", "WINDOW_PRESETS", "ingest",
           "load_sources_yaml", "parse_source", "plan", "process_file"]
