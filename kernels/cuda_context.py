"""A current CUDA context for host-side work that Triton does before its launcher makes one current.

Triton encodes host tensor descriptors (`cuTensorMapEncodeTiled`, for the attention kernels' TMA loads) before
its launcher calls `ensureCudaContext`, and the encode fails with "invalid device context" in a thread that has
no current context. Autograd's backward thread is such a thread when the kernel was loaded in another thread
first: a backward pass run directly (bench, tests) and then through autograd. Seen on the H200 under Triton 3.6
(3.8's launcher has the same order); tests/test_kernels_attention.py has the case (GPU only).
"""
from __future__ import annotations

import ctypes
import threading

_THREAD = threading.local()
_LIBCUDA = None


def ensure_context(device: int) -> None:
    """Make `device`'s primary context current in this thread if no context is (checked once per thread and
    device)."""
    if getattr(_THREAD, "device", None) == device:
        return
    global _LIBCUDA
    if _LIBCUDA is None:
        try:
            _LIBCUDA = ctypes.CDLL("libcuda.so.1")
        except OSError:  # a driver library by another name: leave the thread as it is (Triton's own behaviour)
            _LIBCUDA = False
    if _LIBCUDA is False:
        return
    ctx = ctypes.c_void_p()
    if _LIBCUDA.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and not ctx.value:
        dev = ctypes.c_int()
        if (_LIBCUDA.cuDeviceGet(ctypes.byref(dev), device) != 0
                or _LIBCUDA.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0
                or _LIBCUDA.cuCtxSetCurrent(ctx) != 0):
            raise RuntimeError(f"could not make CUDA device {device}'s context current in this thread")
    _THREAD.device = device
