"""Medical images -> MDS shards -> augmented batches on the GPU.

A library of its own: it imports neither `engine` nor `kernels`, so other trainers can
embed it (see README, "Using the loader in your own training loop").
"""
from loaders.augment import AugmentSpec
from loaders.loader import Batch, Loader, StreamSpec, available_backends, build_loader, count_samples, prepare_cuda
from loaders.shards import COLUMNS, MODALITIES, ShardWriter, make_sample, make_uid

__all__ = [
    "AugmentSpec",
    "Batch",
    "Loader",
    "StreamSpec",
    "available_backends",
    "build_loader",
    "count_samples",
    "prepare_cuda",
    "COLUMNS",
    "MODALITIES",
    "ShardWriter",
    "make_sample",
    "make_uid",
]
