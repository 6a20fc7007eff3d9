"""`python -m bench eval`: the MedMNIST evaluation (engine.eval) at the official split sizes.

Synthetic `.npz` files in the official layout (random uint8 images, 28 px by default, the
train/val/test sizes of the 12 tasks: 708k images in all) are evaluated with a randomly
initialized encoder (ViT-B/16 at 224 px by default) exactly as `python -m engine.eval` does:
uint8 → device → resize/normalize → bf16 forward → pooled features, then the linear probe
(and kNN with --method both) and bootstrap CIs. Reported per task: feature-extraction
seconds and images/s, probe seconds; overall: total wall time.

Baseline: the encoder's plain forward (`model(x)`, bf16 autocast, no_grad) on an already
normalized, already resized batch resident on the device — what the forward alone costs.
Ratio = feature-extraction images/s over all tasks / baseline images/s (target ≥ 0.8).

Options: --tasks (default all 12), --max-per-split N (cap every split for a quick run),
--model, --img-size, --size (stored image size), --batch-size, --compile, --method,
--bootstrap, --device, --workdir (keep/reuse the synthetic files there).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import bar_plot, card_name, print_table, write_result


def write_synthetic(root: Path, tasks: list[str], size: int, cap: int | None, seed: int = 0) -> dict[str, int]:
    """Random images and labels with each task's channels, classes and official split sizes."""
    from engine.evaluation.medmnist import SPLITS, TASKS

    rng = np.random.default_rng(seed)
    counts = {}
    for task in tasks:
        info = TASKS[task]
        name = f"{task}.npz" if size == 28 else f"{task}_{size}.npz"
        path = root / name
        sizes = [min(n, cap) if cap else n for n in info.splits]
        counts[task] = sum(sizes)
        if path.is_file():
            with np.load(path) as f:
                if [len(f[f"{s}_labels"]) for s in SPLITS] == sizes:
                    continue
        arrays = {}
        for split, n in zip(SPLITS, sizes):
            shape = (n, size, size, 3) if info.channels == 3 else (n, size, size)
            arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
            if info.multilabel:
                arrays[f"{split}_labels"] = rng.integers(0, 2, (n, info.num_classes), dtype=np.uint8)
            else:
                # every class present in every split so the AUC is defined
                arrays[f"{split}_labels"] = ((np.arange(n) % info.num_classes)[rng.permutation(n)]
                                             .reshape(-1, 1).astype(np.uint8))
        np.savez(path, **arrays)
    return counts


def median_ms(fn, cuda: bool, warmup: int, iters: int) -> float:
    """Median ms per call, one CUDA-event pair per call: a ViT-B batch takes ~100 ms, so
    a fixed repetition budget (do_bench's rep) would leave only a sample or two."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    from engine.eval import create_encoder, evaluate_tasks
    from engine.evaluation.features import IMAGENET_MEAN, IMAGENET_STD, extract_features, preprocess
    from engine.evaluation.medmnist import ALL_TASKS
    from engine.evaluation.probe import ProbeConfig

    p = argparse.ArgumentParser(prog="python -m bench eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(ALL_TASKS))
    p.add_argument("--max-per-split", type=int, help="cap every split (quick runs)")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--size", type=int, default=28, help="stored MedMNIST image size")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--compile", action="store_true", help="torch.compile forward_features (both sides)")
    p.add_argument("--method", choices=["linear", "knn", "both"], default="linear")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", help="where the synthetic files go (kept); default a temporary folder")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    counts = write_synthetic(work, args.tasks, args.size, args.max_per_split)
    gen_s = time.perf_counter() - t0
    print(f"synthetic data: {sum(counts.values()):,} images in {work} ({gen_s:.1f}s)", file=sys.stderr)

    torch.manual_seed(0)
    model = create_encoder(args.model, args.img_size).to(device).eval()
    if args.compile and cuda:
        model.forward_features = torch.compile(model.forward_features)
    params = sum(p.numel() for p in model.parameters())
    bs = args.batch_size

    # baseline: plain forward of a normalized, resized batch already on the device
    raw = torch.randint(0, 256, (bs, args.size, args.size), dtype=torch.uint8, device=device)
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    std = torch.tensor(IMAGENET_STD, device=device)
    x = preprocess(raw, args.img_size, mean, std)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def plain_forward():
        with torch.no_grad(), autocast:
            return model(x)

    base_ms = median_ms(plain_forward, cuda, warmup=3 if cuda else 1, iters=15 if cuda else 3)
    base_ips = bs / (base_ms / 1e3)
    # warm the extraction path (allocator, pinned buffers, compile) outside the timing
    warm = raw.cpu().numpy()
    extract_features(model, np.concatenate([warm, warm[: bs // 2]]), img_size=args.img_size, device=device,
                     batch_size=bs, progress=False)

    methods = ["linear", "knn"] if args.method == "both" else [args.method]
    t1 = time.perf_counter()
    results = evaluate_tasks(
        model, work, args.tasks, methods=methods, img_size=args.img_size, device=device, batch_size=bs,
        size=args.size, probe=ProbeConfig(epochs=args.epochs), bootstrap=args.bootstrap, progress=False,
    )
    total_s = time.perf_counter() - t1

    rows = []
    first = results[methods[0]]
    for task in args.tasks:
        r = first[task]
        n = r["n_train"] + r["n_val"] + r["n_test"]
        row = {
            "task": task, "images": n, "load_s": r["load_s"], "extract_s": r["extract_s"],
            "extract_img_per_s": n / r["extract_s"] if r["extract_s"] else float("nan"),
            "linear_s" if methods[0] == "linear" else "knn_s": r["fit_s"], "auc": r["auc"],
            "epochs": r.get("epochs_run", ""),
        }
        if len(methods) == 2:
            row["knn_s"] = results["knn"][task]["fit_s"]
        rows.append(row)
    n_all = sum(r["images"] for r in rows)
    ext_all = sum(r["extract_s"] for r in rows)
    ext_ips = n_all / ext_all
    ratio = ext_ips / base_ips
    cols = ["task", "images", "load_s", "extract_s", "extract_img_per_s", *([m + "_s" for m in methods]), "epochs",
            "auc"]
    print_table(rows, cols)
    print()
    print_table(
        [{"what": "plain forward (baseline)", "img_per_s": base_ips},
         {"what": "feature extraction, all tasks", "img_per_s": ext_ips},
         {"what": "ratio (target >= 0.8)", "img_per_s": ratio}],
        ["what", "img_per_s"],
    )
    probe_s = sum(r[m + "_s"] for r in rows for m in methods)
    print(f"\n{card_name()}: {len(rows)} tasks, {n_all:,} images; extraction {ext_all:.1f}s, "
          f"probe {probe_s:.1f}s, total wall {total_s:.1f}s ({total_s / 60:.2f} min)")

    payload = {
        "model": args.model, "img_size": args.img_size, "params": params, "stored_size": args.size,
        "batch_size": bs, "compile": bool(args.compile and cuda), "methods": methods, "bootstrap": args.bootstrap,
        "max_per_split": args.max_per_split, "images": n_all,
        "baseline": {"what": "model(x) on a resident normalized batch, bf16 autocast", "img_per_s": base_ips,
                     "ms_per_batch": base_ms},
        "extraction": {"img_per_s": ext_ips, "seconds": ext_all},
        "ratio_extraction_vs_forward": ratio,
        "probe_seconds": probe_s,
        "total_seconds": total_s,
        "synthetic_data_seconds": gen_s,
        "tasks": rows,
    }
    path = write_result("eval", payload, argv if argv is not None else sys.argv[1:])
    bar_plot(
        path.with_suffix(".png"), [r["task"] for r in rows],
        {"feature extraction": [r["extract_img_per_s"] for r in rows],
         "plain forward (baseline)": [base_ips] * len(rows)},
        "images / s", f"MedMNIST feature extraction, {args.model} @ {args.img_size}px — {card_name()}",
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
