"""A no-grad forward of fixed shape replayed as a CUDA graph: DINOv2's teacher.

DINOv2 compiles per block and launches every kernel from Python, and at ViT-L, batch 32 on one H200 the step was bound
by that host work: 185 ms a step against 151 ms of device time (bench/results/profiles/vit_l_dinov2-1gpu-prof-l.txt).
The teacher's pass over the global crops is the part that can be captured as it is: no gradient, no randomness, the
same shapes every step, parameters updated in place (the EMA). `GraphedForward(fn)` runs `fn(x)` eagerly for a few
calls per input signature (torch.compile compiles there), then captures it once and from then on copies x into the
graph's input and replays. The output is the graph's own tensor, overwritten by the next replay: read it within the
step (DINOv2 reduces it to head outputs at once). A capture that fails (an op that syncs with the host, a collective)
raises a RuntimeError that names the option to turn off: the run cannot go on eagerly after it, since a failed capture
leaves CUDA's random generator in capture mode (the next torch.rand on the device raises).
"""
from __future__ import annotations

from typing import Callable

import torch


class GraphedForward:
    """fn(x) -> tensor, replayed as a CUDA graph per (shape, dtype, device, autocast) of x after `warmup` eager calls.
    Call it under torch.no_grad(); CUDA tensors only (anything else runs fn)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], warmup: int = 2, name: str = "forward",
                 option: str = "the CUDA graph"):
        self.fn, self.warmup, self.name, self.option = fn, warmup, name, option
        self.graphs: dict[tuple, tuple] = {}
        self.calls: dict[tuple, int] = {}

    @staticmethod
    def usable(x: torch.Tensor) -> bool:
        return x.is_cuda

    @staticmethod
    def key(x: torch.Tensor) -> tuple:
        amp = torch.is_autocast_enabled("cuda")
        return tuple(x.shape), x.dtype, x.device, amp, torch.get_autocast_dtype("cuda") if amp else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.usable(x) or torch.is_grad_enabled():
            return self.fn(x)
        key = self.key(x)
        entry = self.graphs.get(key)
        if entry is None:
            self.calls[key] = n = self.calls.get(key, 0) + 1
            if n <= self.warmup:
                return self.fn(x)
            try:
                entry = self.graphs[key] = self._capture(x)
            except Exception as e:
                # Not run on eagerly: a failed capture leaves CUDA's random generator in capture mode (seen on an H200,
                # torch 2.11: the step's next torch.rand raised "Offset increment outside graph capture").
                raise RuntimeError(f"{self.name}: capturing a CUDA graph for input {tuple(x.shape)} failed "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                                   f"run without {self.option}") from e
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out

    def _capture(self, x: torch.Tensor) -> tuple:
        static_in = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # one more call off the default stream, as capture wants (lazy inits)
            self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(static_in)
        return graph, static_in, static_out
