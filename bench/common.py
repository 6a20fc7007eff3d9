"""What every bench suite shares: the card name, versions, timing, and the result file."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def card_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.processor() or platform.machine()}-{os.cpu_count()}cores"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "triton", "torchvision", "timm", "numpy", "streaming", "nvidia.dali", "ffcv", "PIL"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda"] = str(torch.version.cuda)
            out["driver_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception:
        pass
    return out


def cuda_time_ms(fn: Callable[[], Any], warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds per call: CUDA events on a GPU, wall clock elsewhere."""
    import torch

    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=0, rep=max(iters, 25), return_mode="median"))
        except Exception:
            pass
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


ENV_RECORDED = ("CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_VISIBLE_DEVICES")


def write_result(suite: str, payload: dict[str, Any], argv: list[str] | None = None, tag: str | None = None,
                 command_suite: str | None = None, module: str = "bench") -> Path:
    """Write bench/results/<suite>-<card>-<date>[-<tag>].json with card, versions and command.
    `tag` tells runs of one suite apart on the same day (e.g. the models measured); `command_suite` is the suite
    whose command line wrote it where that differs from `suite` (bench train's scaling mode writes "train-scaling");
    `module`: the module run with `python -m` (a probe of its own, e.g. "bench._probe_tail_bound", takes no suite
    in its command line)."""
    card = card_name()
    words = [command_suite or suite] if module == "bench" else []
    cmd = f"python -m {module} " + " ".join(shlex.quote(a) for a in [*words, *(argv or [])])
    record = {
        "suite": suite,
        "card": card,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": cmd,
        "versions": versions(),
        # CUDA settings that change what is measured (read when the CUDA context starts)
        "env": {k: os.environ[k] for k in ENV_RECORDED if k in os.environ},
        **payload,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{suite}-{slug(card)}-{_dt.date.today().isoformat()}{'-' + slug(tag) if tag else ''}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def worker_error(text: str, keep: int = 1500) -> str:
    """What a failed torchrun launch printed, shortened for a result row or a message: the ranks' own output (their
    tracebacks, a C++ abort's message) and the launcher's summary of which rank failed how, without the launcher's
    traceback between them, which says only that a child failed and would crowd the ranks' lines out of a plain
    tail."""
    head, sep, rest = text.rpartition("Traceback (most recent call last):")
    if not sep or "torch/distributed/run.py" not in rest:
        return text[-keep:]
    cut = max(rest.find("Root Cause"), 0)  # the first rank to fail, which the others' failures follow
    summary = rest[cut:][-keep // 3:]
    return head.rstrip()[-(keep - len(summary) - 5):] + "\n...\n" + summary


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def bar_plot(path: Path, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> Path | None:
    """Grouped bar chart as PNG beside the JSON; skipped quietly without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    n = max(len(series), 1)
    width = 0.8 / n
    # labels of several lines (a model and its settings) stand upright, each as wide as its longest line needs
    multiline = any("\n" in label for label in labels)
    longest = max((len(line) for label in labels for line in label.split("\n")), default=0)
    per_label = max(1.2, 0.1 * longest + 0.3) if multiline else 1.2
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * per_label), 4 + 0.3 * multiline * max(
        label.count("\n") for label in labels)))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (n - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=0 if multiline else 20, ha="center" if multiline else "right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
