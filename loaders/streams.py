"""The CUDA stream a training step runs on, seen from the loader's side.

The GPU backends queue their decode and augmentation kernels on their own streams while the
step runs. At equal priority the block scheduler interleaves those kernels with the step's, so
each decoded batch delays the step by roughly its own kernel time. Run the step on a
high-priority stream and the decode work fills the SMs the step leaves idle instead:

    with loaders.step_stream(device):      # "high" priority on CUDA; a no-op on CPU
        for batch in loader:               # hand-over (events, record_stream) onto this stream
            train_step(batch.images)

Enter it around the whole loop, the loader iteration included: the loader hands each batch to
the stream that is current when `next()` is called.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRIORITIES = ("normal", "high")


@contextlib.contextmanager
def step_stream(device: torch.device | str, priority: str = "high") -> Iterator["torch.cuda.Stream | None"]:
    """Make a fresh CUDA stream of `priority` current for the block (it first waits for the work
    already queued on the current stream, and the current stream waits for it on exit). Yields
    the stream, or None where there is nothing to do (CPU, or priority "normal")."""
    if priority not in PRIORITIES:
        raise ValueError(f"stream priority must be one of {', '.join(PRIORITIES)}; got {priority!r}")
    device = torch.device(device)
    if device.type != "cuda" or priority == "normal":
        yield None
        return
    outer = torch.cuda.current_stream(device)
    # the lowest number CUDA accepts (torch clamps to the device's range, e.g. -5 on Hopper)
    _, highest = torch.cuda.Stream.priority_range()
    stream = torch.cuda.Stream(device, priority=highest)
    stream.wait_stream(outer)
    try:
        with torch.cuda.stream(stream):
            yield stream
    finally:
        outer.wait_stream(stream)
