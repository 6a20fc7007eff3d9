"""`python -m bench comm`: what FSDP2's collectives get between the GPUs of this host.

FSDP2 all-gathers each block's bf16 parameters (forward, and again in backward) and
reduce-scatters its fp32 gradients. This measures both collectives through NCCL at FSDP's
message sizes, one process per GPU under torchrun, against the device-to-device copy of one
GPU (the ceiling a link cannot beat), and prints the transport NCCL chose (P2P/NVLink,
SHM through host memory, ...). Scaling problems start here when the link is slow.

    python -m bench comm --gpus 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from bench.common import print_table, worker_error, write_result

SIZES_MB = (16, 64, 256)


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def worker(out_path: str, iters: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rows = []
    for mb in SIZES_MB:
        for op, dtype in (("all_gather", torch.bfloat16), ("reduce_scatter", torch.float32)):
            full = torch.empty(mb * 2**20 // dtype.itemsize, dtype=dtype, device="cuda")
            shard = torch.empty(full.numel() // world, dtype=dtype, device="cuda")
            if op == "all_gather":
                fn = lambda: dist.all_gather_into_tensor(full, shard)  # noqa: E731
            else:
                fn = lambda: dist.reduce_scatter_tensor(shard, full)  # noqa: E731
            sec = _time(fn, iters)
            # NCCL's bus bandwidth: what each link carries, (world - 1) / world of the buffer.
            rows.append({"op": op, "dtype": str(dtype).split(".")[1], "buffer_mb": mb, "ms": sec * 1e3,
                         "busbw_gb_s": full.numel() * dtype.itemsize * (world - 1) / world / sec / 1e9})
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy = x.numel() * 2 / _time(lambda: y.copy_(x), iters) / 1e9
    if rank == 0:
        json.dump({"rows": rows, "copy_gb_s": copy, "world": world}, open(out_path, "w"))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench comm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=max(2, torch.cuda.device_count()))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_json:
        worker(args.worker_json, args.iters)
        return 0
    if torch.cuda.device_count() < args.gpus:
        print(f"needs {args.gpus} CUDA devices, this machine has {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        env = dict(os.environ, NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,P2P,SHM,NET")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
               "-m", "bench", "comm", "--worker-json", out, "--iters", str(args.iters)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        log = r.stdout + r.stderr
        if r.returncode or not os.path.exists(out):
            print(worker_error(log, 3000), file=sys.stderr)
            return 1
        res = json.load(open(out))
    transports = sorted({m.group(0).strip() for m in re.finditer(r"via (P2P/\S+|SHM\S*|NET/\S+|P2P)", log)})
    topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
    print_table(res["rows"], ["op", "dtype", "buffer_mb", "ms", "busbw_gb_s"])
    print(f"one GPU's device-to-device copy: {res['copy_gb_s']:.0f} GB/s (read + write)")
    print("NCCL transports:", ", ".join(transports) or "(none reported)")
    print(topo)
    write_result("comm", {**res, "nccl_transports": transports, "topology": topo,
                          "nccl_log_tail": [ln for ln in log.splitlines() if "NCCL" in ln][-40:]},
                 argv if argv is not None else sys.argv[1:], tag=f"{args.gpus}gpu")
    return 0
