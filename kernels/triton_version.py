"""Which Triton the kernels were verified with, and what `impl="auto"` does under another.

Measured on an H200 under Triton 3.6.0 (torch 2.11) and 3.8.0 (torch 2.14), and tested under the interpreter with
3.6, 3.7 and 3.8 (kernels/README.md, "Under Triton 3.8"). Under 3.3 the TMA paths cannot import their tensor
descriptors, and under 3.5's interpreter a split head dim's descriptor fails to build; `pyproject.toml` allows torch
2.4 (Triton 3.0). So "auto" takes our kernels only from VERIFIED_FROM on and otherwise runs the torch / SDPA paths,
saying so once. An explicit `impl="triton"` (or `model.kernels: triton`) still runs them.
"""
from __future__ import annotations

import contextlib
import re
import warnings

import triton

VERIFIED_FROM = (3, 6)


def parse(version: str) -> tuple[int, int]:
    """(major, minor) of a Triton version string ("3.6.0", "3.8.0+git1234" -> (3, 8)); (0, 0) if unreadable."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else (0, 0)


TRITON = parse(triton.__version__)
_warned = False


def auto_ok() -> bool:
    """Whether "auto" may pick our Triton kernels: the installed Triton is one they were verified with. The first
    time it is not, a warning says what runs instead and how to get the kernels."""
    global _warned
    if TRITON >= VERIFIED_FROM:
        return True
    if not _warned:
        _warned = True
        warnings.warn(
            f"Triton {'.'.join(map(str, TRITON))} is older than {'.'.join(map(str, VERIFIED_FROM))}, the oldest the "
            "kernels in kernels/ were verified with: impl='auto' and model.kernels: auto run the torch / SDPA paths "
            "instead. Upgrade torch (it brings its Triton) to use them, or ask for them explicitly with "
            "impl='triton' / model.kernels: triton.", RuntimeWarning, stacklevel=3)
    return False


_planning = False


@contextlib.contextmanager
def planning():
    """While active, "auto" treats meta tensors as CUDA ones: engine.plan traces a run's memory on the meta device
    through the ops a GPU run takes (our kernels' custom ops run there through their fake implementations)."""
    global _planning
    was, _planning = _planning, True
    try:
        yield
    finally:
        _planning = was


def on_cuda(x) -> bool:
    """x is a CUDA tensor, or a meta one while planning()."""
    return x.is_cuda or (_planning and x.is_meta)


def resolve(impl: str, x) -> str:
    """The masking and loss ops' `impl`: "triton" or "torch" as given, "auto" = triton for a CUDA tensor x under a
    verified Triton (auto_ok), else torch; anything else is an error."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        return "triton" if on_cuda(x) and auto_ok() else "torch"
    return impl
