"""Fixed-shape passes replayed as CUDA graphs: DINOv2's teacher (a no-grad forward) and its student's blocks (forward
and backward).

DINOv2 compiles per block and launches every kernel from Python, and at ViT-L, batch 32 on one H200 the step was bound
by that host work: 185 ms a step against 151 ms of device time (bench/results/profiles/vit_l_dinov2-1gpu-prof-l.txt).
The teacher's pass over the global crops is the part that can be captured as it is: no gradient, no randomness, the
same shapes every step, parameters updated in place (the EMA). `GraphedForward(fn)` runs `fn(x)` eagerly for a few
calls per input signature (torch.compile compiles there), then captures it once and from then on copies x into the
graph's input and replays. The output is the graph's own tensor, overwritten by the next replay: read it within the
step (DINOv2 reduces it to head outputs at once). A capture that fails (an op that syncs with the host, a collective)
is said once on stderr and that signature runs eagerly from then on.

`GraphedTraining(make)` does the same for a module with gradients (as torch.cuda.make_graphed_callables does: one graph
for the forward, one for the backward, inside one autograd node): DINOv2's student blocks over the packed crops, whose shapes are
fixed too (the iBOT masks act before the blocks, the drop-path draws come in as an argument).
"""
from __future__ import annotations

import sys
from typing import Callable, NamedTuple

import torch


class GraphedForward:
    """fn(x) -> tensor, replayed as a CUDA graph per (shape, dtype, device, autocast) of x after `warmup` eager calls.
    Call it under torch.no_grad(); CUDA tensors only (anything else runs fn)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], warmup: int = 2, name: str = "forward"):
        self.fn, self.warmup, self.name = fn, warmup, name
        self.graphs: dict[tuple, tuple] = {}
        self.calls: dict[tuple, int] = {}
        self.failed: set[tuple] = set()

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
            if key in self.failed or n <= self.warmup:
                return self.fn(x)
            try:
                entry = self.graphs[key] = self._capture(x)
            except Exception as e:  # noqa: BLE001 -- any capture failure: run this signature eagerly
                self.failed.add(key)
                print(f"{self.name}: no CUDA graph for input {tuple(x.shape)} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160] if str(e) else ''}); it runs eagerly", file=sys.stderr)
                return self.fn(x)
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


class GraphedTraining:
    """module(*args) -> tensor with gradients, its forward and backward replayed as CUDA graphs (as
    torch.cuda.make_graphed_callables would, see _capture) per input signature after `warmup` eager calls: DINOv2's
    student blocks.

    `make()` builds the module, once for the eager calls and once per capture; its parameters are the live model's, so the optimizer's in-place updates reach
    the graphs. Every argument is a CUDA tensor (anything else, or no gradient, runs the module). The output is the
    graph's own tensor, overwritten by the next replay, and so is the gradient it hands back: autograd keeps that tensor
    as a parameter's .grad when .grad was None. A replay that would then overwrite accumulated gradients (the micro-
    batches after the first) copies them out first. The capture waits for a call with no gradient accumulated yet (a
    step's first micro-batch). A failed capture raises: it leaves CUDA's random generator in capture mode, so nothing
    could run on eagerly after it."""

    def __init__(self, make: Callable[[], torch.nn.Module], warmup: int = 2, name: str = "forward and backward"):
        self.make, self.warmup, self.name = make, warmup, name
        self.module = make()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.graphs: dict[tuple, Callable] = {}
        self.calls: dict[tuple, int] = {}

    @staticmethod
    def usable(args: tuple) -> bool:
        return all(a.is_cuda for a in args)

    @staticmethod
    def key(args: tuple) -> tuple:
        amp = torch.is_autocast_enabled("cuda")
        sig = tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args)
        return sig, amp, torch.get_autocast_dtype("cuda") if amp else None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not self.usable(args):
            return self.module(*args)
        key = self.key(args)
        graphed = self.graphs.get(key)
        if graphed is None:
            self.calls[key] = n = self.calls.get(key, 0) + 1
            # captured at the first call of a step (no gradient yet): then no autograd graph of the caller's reaches
            # the parameters, whose gradient accumulators belong to the default stream (a capture would wait on it)
            if n <= self.warmup or any(p.grad is not None for p in self.params):
                return self.module(*args)
            try:
                graphed = self.graphs[key] = self._capture(args)
            except Exception as e:  # a failed capture leaves CUDA's random generator unusable: stop here, clearly
                raise RuntimeError(f"{self.name}: capturing the CUDA graphs for inputs {[tuple(a.shape) for a in args]} "
                                   f"failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                                   "run without this option") from e
        for p in self.params:
            if p.grad is not None:  # perhaps the backward graph's own buffer: the replay would overwrite the sum
                p.grad = p.grad.clone()
        return graphed(*args)

    def _capture(self, args: tuple) -> Callable:
        """One forward graph and one backward graph in a shared pool (what torch.cuda.make_graphed_callables does,
        written out so that no autograd graph of the capture outlives it: that one's parameter accumulators belong to
        the capture's stream, and every later backward would wait on that stream for each parameter)."""
        module = self.make()
        params = tuple(p for p in module.parameters() if p.requires_grad)
        static_in = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        wrt = tuple(a for a in static_in if a.requires_grad) + params
        amp = torch.is_autocast_enabled("cuda")
        # without autocast's cache of cast weights: a cast made once would be baked into the graph
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=amp, cache_enabled=False):
            side = torch.cuda.Stream(device=args[0].device)
            side.wait_stream(torch.cuda.current_stream(args[0].device))
            with torch.cuda.stream(side):  # one more pass off the default stream, as capture wants (lazy inits)
                out = module(*static_in)
                torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)
                del out
            torch.cuda.current_stream(args[0].device).wait_stream(side)
            fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(fwd, pool=pool, stream=side):  # the warm-up's stream: its lazy inits are per stream
                static_out = module(*static_in)
            static_gout = torch.empty_like(static_out)
            with torch.cuda.graph(bwd, pool=pool, stream=side):
                static_gin = torch.autograd.grad(static_out, wrt, static_gout, allow_unused=True)
        entry = _Captured(fwd, bwd, static_in, static_out.detach(), static_gout, static_gin, len(params))
        del static_out  # frees the capture's autograd graph
        return lambda *a: _Replay.apply(entry, *a, *params)


class _Captured(NamedTuple):
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph
    static_in: tuple
    static_out: torch.Tensor
    static_gout: torch.Tensor
    static_gin: tuple  # gradients of the inputs that require one, then of the parameters (None: unused)
    params: int


class _Replay(torch.autograd.Function):
    """One autograd node: forward copies the inputs into the graph's and replays the forward graph; backward copies the
    output's gradient in and replays the backward graph. The gradients handed back are the graph's own buffers."""

    @staticmethod
    def forward(ctx, entry: _Captured, *inputs):
        n = len(inputs) - entry.params
        for s, a in zip(entry.static_in, inputs[:n]):
            s.copy_(a)
        entry.fwd.replay()
        ctx.entry, ctx.needs = entry, [a.requires_grad for a in entry.static_in]
        return entry.static_out.detach()

    @staticmethod
    def backward(ctx, gout):
        e = ctx.entry
        e.static_gout.copy_(gout)
        e.bwd.replay()
        grads = iter(e.static_gin)
        out = [next(grads) if need else None for need in ctx.needs] + [next(grads) for _ in range(e.params)]
        return (None, *(g.detach() if g is not None else None for g in out))
