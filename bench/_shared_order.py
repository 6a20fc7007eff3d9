"""The shared-memory order Triton gives the forward's grouped tail tiles, compiled offline for an H100/H200 (sm_90),
without a GPU. The grouped tail (config key TAIL_G, kernels.attn._fwd_tail_group) holds G heads' tail rows as
[G, rows, d] tiles. Where a tile's shared copy keeps each head's rows on consecutive 128-byte lines (order
[2, 1, 0]), the swizzle spreads the 8 rows one `ldmatrix` reads over 8 phases. Where the head dim sits between them
(order [2, 0, 1]), line = G x row + head, and with G = 4 those 8 rows fall on 2 phases: a 4-way bank conflict.
Triton 3.6 gives every such tile [2, 1, 0]; Triton 3.8 gives the Q and V copies [2, 0, 1], and the grouped tails
that win under 3.6 lose under 3.8 (kernels/README.md, "Why tail groups lose under 3.8"). So the defaults drop them
from 3.7 on (kernels.attn.POW2_TAIL_GROUPS). Run this under a newer Triton to see whether that still holds.

    python -m bench._shared_order                      # each [G, rows, d] buffer of the d = 64 forward, G = 4
    TRITON_INTERPRET=0 python -m bench._shared_order --json   # (where the interpreter is on, e.g. under the tests)

A proxy for the bank conflicts, not a speed: speed is measured by `python -m bench kernels --tune-tail-groups`.
"""
from __future__ import annotations

import re
import sys


def grouped_tail_buffers(d: int = 64, g: int = 4, rows: int = 16) -> list[dict]:
    """Each 3D shared buffer ([G, rows, d], or [stages, G, rows, d] where the walk is pipelined) of
    kernels.attn._attn_fwd compiled for sm_90 with tail groups of g heads of `rows` rows at head dim d (blocks of 64,
    4 warps, 3 stages, the d = 64 defaults' register cap): {"shape", "order", "rows_consecutive"}, in the order the
    compiler allocates them."""
    from bench._ptx import compile_sm90
    from kernels import attn

    fn = attn._attn_fwd
    ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "CU": "*i32"}
    const = dict(HEAD_DIM=d, VARLEN=False, ALIGN=8, BLOCK_M=64, BLOCK_N=64, TAIL_M=rows, TAIL_N=16, BLOCK_D=d,
                 EVEN_D=True, WS=False, D2=0, TMA=False, TAIL_G=g, TAIL_GW=max(16, 64 // g), TAIL_GD=d, LEAN=False,
                 TAIL_GD2=0, TAIL_PRE=False, TAIL_FIRST=False, KD=None, VD=None)
    const = {k: v for k, v in const.items() if k in fn.arg_names}
    sig = {a: ptrs.get(a, "fp32" if a == "qk_scale" else "i32") for a in fn.arg_names if a not in const}
    ir = compile_sm90(fn, sig, const, ptrs, num_warps=4, num_stages=3, maxnreg=128).asm["ttgir"]
    orders = {m.group(1): [int(x) for x in m.group(2).split(",")]
              for m in re.finditer(r"^(#shared\d*) = #ttg\.swizzled_shared<\{[^}]*order = \[([\d, ]+)\]", ir, re.M)}
    out = []
    for dims, enc in re.findall(r"local_alloc[^\n]*?-> !ttg\.memdesc<((?:\d+x)+)\w+, (#shared\d*)", ir):
        shape = [int(x) for x in dims.rstrip("x").split("x")]
        if enc not in orders or shape[-3:] != [g, rows, d]:
            continue
        order = orders[enc]
        if len(order) == 4:  # a pipelined buffer's encoding with its stage dim: the order of the tile's own dims
            order = [o - 1 for o in order if o != 0]
        out.append({"shape": shape, "order": order, "rows_consecutive": order[:2] == [2, 1]})
    return out


def main(argv: list[str] | None = None) -> int:
    """--json: one JSON object {"triton": version, "buffers": [...]} instead of the lines."""
    import triton

    bufs = grouped_tail_buffers()
    if "--json" in (argv or []):
        import json

        print(json.dumps({"triton": triton.__version__, "buffers": bufs}))
        return 0
    print(f"Triton {triton.__version__}: the d = 64 forward's grouped tail (G = 4, 16 rows), shared buffers")
    for b in bufs:
        ok = "rows consecutive" if b["rows_consecutive"] else "heads between rows: 4-way ldmatrix bank conflicts"
        print(f"  {'x'.join(map(str, b['shape'])):14s} order {b['order']}  {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
