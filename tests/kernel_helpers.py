"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter:
tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton."""
import importlib


def interpreted_kernels():
    """The `kernels` package, checked to hold interpreted (not compiled) Triton kernels."""
    attn = importlib.import_module("kernels.attn")
    if type(attn._attn_fwd).__name__ != "InterpretedFunction":
        raise RuntimeError("kernels was imported before TRITON_INTERPRET=1 was set; run these tests "
                           "through pytest, whose tests/conftest.py sets it")
    return importlib.import_module("kernels")


def zero_fills(fn):
    """The aten zero fills that running fn launches (what autograd adds for an output that takes no gradient, unless
    the op's context sets materialize_grads off)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::zeros_like")]
