"""What the tail rows cost, measured (not guessed): each split-head-dim shape's default attention configs timed at
its length N and at the length of its full blocks only (N = 257 -> 256, 65 -> 64), same batch and heads, fwd and
bwd graphed. The difference bounds what any tail scheme (grouped, split, folded) can gain at that shape.

    python -m bench._probe_tail_bound [--tag TAG]
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench.common import write_result
from bench.kernels import ATTN_SHAPES, graph_ms

SHAPES = ["vit-g-n257-d88", "vit-h-n257-d80", "mae-g-enc-n65-d88", "dinov2-l-n257-d64", "vit-l-n197-d64"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench._probe_tail_bound", description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="tail-bound")
    args = ap.parse_args(argv)
    from kernels import attn

    rows = []
    for name in SHAPES:
        B, H, N, D = ATTN_SHAPES[name]
        fwd, bwd = attn._fwd_config(N, D), attn._bwd_config(N, D)
        block = min(fwd["BLOCK_M"], bwd["BLOCK_N"], attn._kv_q_dq_config(bwd)["BLOCK_M"])
        row = {"shape": name, "B": B, "H": H, "D": D, "fwd_config": fwd, "bwd_config": bwd}
        for n in (N, N - N % block):
            q, k, v, do = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            s = D ** -0.5
            o, lse = attn.attention_fwd(q, k, v, s, config=fwd)
            f = graph_ms(lambda: attn.attention_fwd(q, k, v, s, config=fwd))
            b = graph_ms(lambda: attn.attention_bwd(do, q, k, v, o, lse, s, config=bwd))
            flops = attn.attention_flops(B * H * n * n, D)  # forward + backward
            row[f"n{n}"] = {"fwd_ms": f, "bwd_ms": b, "ms": f + b, "tflops": flops / (f + b) / 1e9}
            print(f"{name} N={n}: fwd {f:.4f} bwd {b:.4f} ms, {flops / (f + b) / 1e9:.0f} TFLOP/s", file=sys.stderr)
        full, tail = row[f"n{N - N % block}"], row[f"n{N}"]
        row["tail_share"] = 1 - full["ms"] / tail["ms"]  # of the N-row time, what the rows past the blocks cost
        rows.append(row)
    write_result("kernels-probe", {"rows": rows}, sys.argv[1:] if argv is None else argv, tag=args.tag,
                 module="bench._probe_tail_bound")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
