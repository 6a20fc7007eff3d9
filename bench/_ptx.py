"""What the MAE loss kernel compiles to, without a GPU: its global load/store instructions per thread,
compiled offline for an H100/H200 (sm_90) with 16-byte aligned pointers, as the launcher specializes them.

    python -m bench._ptx     # the main loss kernel, forward and backward, in MAE's order and channel-major
    TRITON_INTERPRET=0 python -m bench._ptx --json       # (where the interpreter is on, e.g. under the tests)

A proxy for what bounds the kernel (its loads), not a speed: speed is measured by `python -m bench kernels`.
"""
from __future__ import annotations

import collections
import re
import sys


def compile_sm90(fn, signature: dict, constexprs: dict, aligned, **options):
    """`fn` (a @triton.jit kernel) compiled offline for sm_90, as the launcher would specialize it: `signature` maps
    each runtime argument to its Triton type, `constexprs` each constexpr argument to its value, and the arguments
    named in `aligned` are taken as 16-byte aligned. Returns Triton's compiled kernel (its .asm holds "ttgir", "ptx"
    ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature) | {k: "constexpr" for k in constexprs}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def loss_memory_ops(cpq: bool, backward: bool, *, C: int = 3, P: int = 16, img: int = 224,
                    patches: int = 4) -> collections.Counter:
    """Counts of `ld.global*` / `st.global*` PTX instructions (per thread) in kernels.loss._loss_rows for
    bf16 images of `img` px and pred rows of p*p*C, pred `cpq` (channel-major) or in MAE's order."""
    import triton

    from kernels import loss

    fn = loss._loss_rows
    n = (img // P) ** 2
    ptrs = {"IMG": "*bf16", "PRED": "*bf16", "MASK": "*fp32", "PART": "*fp32", "DPRED": "*bf16", "GOUT": "*fp32",
            "MSUM": "*fp32"}
    const = dict(si_b=C * img * img, si_c=img * img, si_h=img, si_w=1, sp_b=n * P * P * C, sp_n=P * P * C, C=C, P=P,
                 PAP=triton.next_power_of_2(P * P), BP=patches, NORM=True, BACKWARD=backward, PDL=False, CPQ=cpq)
    sig = ptrs | {"N": "i32", "W_PATCHES": "i32", "G": "i32", "eps": "fp32"}
    ptx = compile_sm90(fn, sig, const, ptrs, num_warps=loss.NUM_WARPS).asm["ptx"]
    return collections.Counter(re.findall(r"\b(?:ld|st)\.global[\w.]*", ptx))


def main(argv: list[str] | None = None) -> int:
    """--json: one JSON object {"forward pqc": {op: count}, ...} instead of the lines (for tests, which run
    this in a process of its own: under TRITON_INTERPRET=1 kernels are interpreted, not compiled)."""
    out = {}
    for backward in (False, True):
        for cpq in (False, True):
            ops = loss_memory_ops(cpq, backward)
            key = f"{'backward' if backward else 'forward'} {'cpq' if cpq else 'pqc'}"
            out[key] = dict(ops)
            if "--json" not in (argv or []):
                print(f"{key:12s}: " + ", ".join(f"{v} x {k}" for k, v in sorted(ops.items())))
    if "--json" in (argv or []):
        import json

        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
