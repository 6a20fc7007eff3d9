"""The attention defaults timed from two source trees in alternating processes, same machine, same call: another
commit's kernels/ unpacked beside (e.g. `mkdir -p .notes/head_kernels && git archive HEAD kernels | tar x -C
.notes/head_kernels`) against the working tree's. Session 30 used it to ask whether the split grouped tails moved
shapes they do not touch (N = 1374).

    ROUNDS=3 OUT=dir python3 -m bench._probe_ab_trees [OTHER_ROOT]   (OTHER_ROOT defaults to .notes/head_kernels)

Writes OUT/ab_trees.json: per round and tree, {shape: [fwd ms, bwd ms]} (CUDA-graph replays).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

SHAPES = {"n1374": (8, 24, 1374, 64), "n197": (128, 16, 197, 64), "n257d88": (96, 16, 257, 88),
          "n261": (128, 24, 261, 64), "n257": (128, 16, 257, 64), "n197d32": (256, 16, 197, 32)}


def one(root: str) -> dict:
    """Time the defaults with `kernels` imported from `root` (first on sys.path, before anything imports it)."""
    sys.path.insert(0, os.path.abspath(root))
    import torch

    from bench.kernels import graph_ms
    from kernels import attn

    print("kernels from", attn.__file__, file=sys.stderr)
    out = {}
    for name, (B, H, N, D) in SHAPES.items():
        q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        s = D ** -0.5
        o, lse = attn.attention_fwd(q, k, v, s)
        out[name] = [graph_ms(lambda: attn.attention_fwd(q, k, v, s)),
                     graph_ms(lambda: attn.attention_bwd(do, q, k, v, o, lse, s))]
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["one"]:
        print(json.dumps(one(argv[1])))
        return 0
    other = argv[0] if argv else ".notes/head_kernels"
    rows = []
    for rnd in range(int(os.environ.get("ROUNDS", 3))):
        for tree, root in (("other", other), ("this", ".")):
            r = subprocess.run([sys.executable, "-m", "bench._probe_ab_trees", "one", root], capture_output=True,
                               text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append({"round": rnd, "tree": tree, "root": root, **res})
            print(rnd, tree, {k: [round(x, 4) for x in v] for k, v in res.items()}, flush=True)
    out = os.environ.get("OUT", "/tmp")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ab_trees.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
