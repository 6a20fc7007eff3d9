"""Programmatic dependent launch (PDL, Hopper and later) for the memory-bound MAE kernels.

A kernel launched with PDL may be scheduled while the kernel before it on the stream is still
running; its programs first wait (`griddepcontrol.wait`) until that kernel has finished and its
writes are visible, then signal at once that the next kernel may be scheduled in turn. What is
hidden is the launch gap between dependent kernels (a few microseconds each), which is a
visible share of kernels that move ~50-150 MB in 25-70 us. Every kernel that takes part waits
before its first load, so the order of memory effects is the plain stream order.

`ENABLED` switches it off process-wide (the bench times both); it is never used under the Triton
interpreter or on CPU tensors, or on GPUs before compute capability 9.0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.3: the device functions and the launch option
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    if "launch_pdl" not in CUDAOptions.__dataclass_fields__:
        raise ImportError("this Triton has no launch_pdl option")
except ImportError:  # pragma: no cover - older Triton: no PDL
    gdc_launch_dependents = gdc_wait = None

ENABLED = True


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on `t`'s device launch with PDL."""
    if not ENABLED or gdc_wait is None or not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def launch_options(pdl: bool) -> dict:
    """The launch keywords of a kernel that takes `PDL: tl.constexpr` and calls `pdl_enter(PDL)`."""
    return {"PDL": pdl, "launch_pdl": True} if pdl else {"PDL": False}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First statement of a PDL kernel: wait for the previous kernel, then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
