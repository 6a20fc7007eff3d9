"""Does DALI decode 256-px JPEGs faster with several pipelines side by side than with one? A probe for the dali
backend's 256-px ceiling (#4), outside the loader: JPEG bytes from memory (the bench's synthetic photos), random
resized crops, one thread per pipeline calling `run()`, each pipeline with its own decoder handle, so one's
host-side work can overlap another's decoding. No DataLoader workers, no shards: the decode side alone.

    python -m bench._dali_pipes                       # on a GPU: 1 x 4, 2 x 2, 2 x 4, 3 x 2 (pipelines x threads)
    python -m bench._dali_pipes --device cpu --seconds 0.3 --batch 8 --rounds 1      # a CPU smoke run

Writes bench/results/loaders-dali-pipes-<card>-<date>.json: images/s summed over the pipelines and the process's
CPU cores (DALI's threads included) per configuration and round.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import threading
import time

import numpy as np
import torch

from bench import common
from bench.common import card_name, slug, versions


def _source(jpegs: list[np.ndarray], batch: int, size: int, seed: int):
    """A DALI batch callback: `batch` random JPEGs with random crops (fn.resize ROIs, a flip on half)."""
    from loaders.backends.dali import roi

    rng = np.random.default_rng(seed)

    def source():
        idx = rng.integers(0, len(jpegs), batch)
        h = rng.integers(max(1, 80 * size // 256), size, batch)  # sides of 80-255 px at 256
        w = rng.integers(max(1, 80 * size // 256), size, batch)
        top = (rng.random(batch) * (size - h)).astype(np.int64)
        left = (rng.random(batch) * (size - w)).astype(np.int64)
        start, end = roi(np.stack([top, left, h, w, rng.integers(0, 2, batch)], 1))
        return [[jpegs[i] for i in idx], start, end]

    return source


def measure(pipes: int, threads: int, *, jpegs, batch: int, size: int, crop: int, seconds: float,
            device: torch.device, seed: int = 0) -> dict:
    """images/s of `pipes` pipelines of `threads` DALI threads each, run side by side for `seconds`."""
    from loaders.backends.dali import build_pipeline

    built = [build_pipeline(batch_size=batch, sizes=[crop], normalize=True, mean=(0.5,) * 3, std=(0.25,) * 3,
                            device=device, out_dtype=torch.float16 if device.type == "cuda" else torch.float32,
                            num_threads=threads, hw_decoder_load=1.0, prefetch_queue_depth=3,
                            source=_source(jpegs, batch, size, seed + j), no_copy=False) for j in range(pipes)]
    rates = [0.0] * pipes

    def run(j: int) -> None:
        p = built[j]
        for _ in range(5):  # warm-up: the decoder's buffers
            p.run()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            p.run()
            n += 1
        rates[j] = n * batch / (time.perf_counter() - t0)

    c0, w0 = time.process_time(), time.perf_counter()
    workers = [threading.Thread(target=run, args=(j,)) for j in range(pipes)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    cores = (time.process_time() - c0) / (time.perf_counter() - w0)
    del built
    return {"pipelines": pipes, "threads": threads, "img_s": sum(rates), "per_pipeline": rates, "cpu_cores": cores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="1x4,2x2,2x4,3x2", help="pipelines x DALI threads each, comma-separated")
    p.add_argument("--size", type=int, default=256, help="JPEG edge length")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=4.0, help="measured time per configuration and round")
    p.add_argument("--rounds", type=int, default=2, help="every configuration once per round, rounds in turn")
    p.add_argument("--device", default="cuda", help="cpu: DALI's CPU decoder (a smoke run; no hardware decoder)")
    p.add_argument("--tag", default=None)
    a = p.parse_args(argv)
    try:
        configs = [tuple(int(x) for x in c.split("x")) for c in a.configs.split(",") if c]
        assert configs and all(len(c) == 2 and min(c) >= 1 for c in configs)
    except (ValueError, AssertionError):
        p.error(f"--configs takes PIPESxTHREADS items such as 2x2; got {a.configs!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: use --device cpu for a smoke run", file=sys.stderr)
        return 2
    from bench.loaders import _encoded_photo

    device = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    jpegs = [np.frombuffer(_encoded_photo((i, a.size)), np.uint8) for i in range(128)]
    rows = []
    for r in range(a.rounds):
        for pipes, threads in configs:
            row = measure(pipes, threads, jpegs=jpegs, batch=a.batch, size=a.size, crop=a.crop,
                          seconds=a.seconds, device=device, seed=100 * r) | {"round": r}
            rows.append(row)
            print(f"{pipes} x {threads} threads: {row['img_s']:,.0f} img/s "
                  f"({', '.join(f'{v:,.0f}' for v in row['per_pipeline'])}), {row['cpu_cores']:.2f} cores", flush=True)
    card = card_name()
    record = {"suite": "loaders-dali-pipes", "card": card,
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m bench._dali_pipes " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
              "versions": versions(), "size": a.size, "crop": a.crop, "batch": a.batch, "seconds": a.seconds,
              "rows": rows}
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS_DIR / (f"loaders-dali-pipes-{slug(card)}-{_dt.date.today().isoformat()}"
                          + (f"-{slug(a.tag)}" if a.tag else "") + ".json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
