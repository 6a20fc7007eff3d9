"""The scaling picture of one or more training runs.

    python -m engine.report RUN_DIR [RUN_DIR ...] [--out DIR] [--method linear|knn]

Per run it reads `config.yaml` (model, objective), `metrics.jsonl` (loss, throughput,
periodic eval AUC) and the newest `eval/<method>*.json` written by `python -m engine.eval`.
It writes into OUT (default ./report):
- `scaling.png`: mean test AUC against encoder parameters, log-log, one series per objective
  (MAE, DINOv2, …) with the power-law fit AUC = c · params^slope;
- `scaling.json` / `scaling.md`: that slope (with intercept and R²) for the mean and for each task;
- `<run>_curves.png`: loss, images/s and (if logged) periodic eval AUC against step;
- `report.md`: all of the above in one page.
A fit needs at least two different model sizes within an objective; with fewer the report
says so and only plots the points.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.eval import json_safe


@dataclass
class Run:
    path: Path
    name: str
    model: str | None
    objective: str
    params: int | None
    metrics: list[dict] = field(default_factory=list)
    evals: dict[str, dict] = field(default_factory=dict)  # method -> newest eval record


def _step_number(record: dict) -> int:
    m = re.search(r"(\d+)", str(record.get("step") or ""))
    return int(m.group(1)) if m else -1


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return rows


def count_params(model: str, img_size: int | None, patch_size: int | None = None) -> int | None:
    """Encoder parameters without allocating them (meta device)."""
    try:
        import timm
        import torch

        kwargs = {"pretrained": False, "num_classes": 0}
        if img_size:
            kwargs["img_size"] = img_size
        if patch_size:
            kwargs["patch_size"] = patch_size
        with torch.device("meta"):
            m = timm.create_model(model, **kwargs)
        return sum(p.numel() for p in m.parameters())
    except Exception:
        return None


def load_run(path: str | Path) -> Run:
    import yaml

    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no config.yaml)")
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    mcfg = config.get("model", {}) or {}
    objective = str((config.get("objective", {}) or {}).get("name") or "unknown").lower()
    evals: dict[str, dict] = {}
    for f in sorted((path / "eval").glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(rec, dict) or "tasks" not in rec or "method" not in rec:
            continue
        rec["_file"] = str(f)
        old = evals.get(rec["method"])
        if old is None or _step_number(rec) >= _step_number(old):
            evals[rec["method"]] = rec
    params = next((int(r["params"]) for r in evals.values() if r.get("params")), None)
    if params is None and mcfg.get("name"):
        params = count_params(mcfg["name"], mcfg.get("img_size"), mcfg.get("patch_size"))
    return Run(path, path.name, mcfg.get("name"), objective, params, read_metrics(path / "metrics.jsonl"), evals)


def power_law_fit(params: list[float], values: list[float]) -> dict | None:
    """Least squares of log10(value) on log10(params): value = 10^intercept · params^slope."""
    pts = [(p, v) for p, v in zip(params, values) if p and v is not None and not math.isnan(v) and v > 0]
    if len({p for p, _ in pts}) < 2:
        return None
    x = np.log10([p for p, _ in pts])
    y = np.log10([v for _, v in pts])
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "n": len(pts)}


def _auc(rec: dict, task: str) -> float:
    v = rec["tasks"].get(task, {}).get("auc")
    return math.nan if v is None else float(v)


def scaling(runs: list[Run], method: str) -> dict:
    """Points and fits per objective: mean AUC over the tasks every run of the objective has, and per task."""
    out: dict = {"method": method, "objectives": {}}
    by_obj: dict[str, list[Run]] = {}
    for r in runs:
        if method in r.evals and r.params:
            by_obj.setdefault(r.objective, []).append(r)
    order = {"mae": 0, "dinov2": 1}
    for obj, group in sorted(by_obj.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])):
        tasks = sorted(set.intersection(*(set(t for t in r.evals[method]["tasks"]
                                              if not math.isnan(_auc(r.evals[method], t))) for r in group)))
        all_tasks = sorted(set.union(*(set(r.evals[method]["tasks"]) for r in group)))
        points = []
        for r in sorted(group, key=lambda r: r.params):
            rec = r.evals[method]
            mean = float(np.mean([_auc(rec, t) for t in tasks])) if tasks else math.nan
            points.append({"run": r.name, "model": r.model, "params": r.params, "step": rec.get("step"),
                           "mean_auc": mean, "tasks": {t: _auc(rec, t) for t in all_tasks}})
        fits = {"mean": power_law_fit([p["params"] for p in points], [p["mean_auc"] for p in points])}
        for t in all_tasks:
            fits[t] = power_law_fit([p["params"] for p in points], [p["tasks"][t] for p in points])
        sizes = len({p["params"] for p in points})
        note = None if sizes >= 2 else f"{obj}: one model size only ({len(points)} run(s)); no power-law fit"
        out["objectives"][obj] = {"tasks_in_mean": tasks, "points": points, "fits": fits, "note": note}
    return out


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(result: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {"mae": "o", "dinov2": "s"}
    for i, (obj, data) in enumerate(result["objectives"].items()):
        color = f"C{i}"
        xs = [p["params"] for p in data["points"]]
        ys = [p["mean_auc"] for p in data["points"]]
        ax.scatter(xs, ys, color=color, marker=markers.get(obj, "^"), zorder=3, label=f"{obj} runs")
        for p in data["points"]:
            ax.annotate(p["model"] or p["run"], (p["params"], p["mean_auc"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        fit = data["fits"].get("mean")
        if fit:
            grid = np.logspace(np.log10(min(xs)) - 0.1, np.log10(max(xs)) + 0.1, 50)
            ax.plot(grid, 10 ** fit["intercept"] * grid ** fit["slope"], color=color, lw=1.5,
                    label=f"{obj} fit: slope {fit['slope']:.4f} (R² {fit['r2']:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("encoder parameters")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))  # AUC spans < 1 decade: plain numbers
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.set_ylabel(f"mean test AUC ({result['method']} probe)")
    notes = [d["note"] for d in result["objectives"].values() if d["note"]]
    title = "AUC vs model size" + ("" if not notes else "\n" + "; ".join(notes))
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if result["objectives"]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluated runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(run: Run, path: Path) -> Path | None:
    rows = [r for r in run.metrics if "step" in r]
    if not rows:
        return None
    plt = _plt()
    eval_rows = [(r["step"], np.nanmean([v for k, v in r.items()
                                         if k.startswith("eval/") and k.endswith("/auc") and v is not None]))
                 for r in rows if any(k.startswith("eval/") and k.endswith("/auc") for k in r)]
    held = [(r["step"], r["gpu_mem_gib"]) for r in rows if r.get("gpu_mem_gib") is not None]
    panels = 2 + bool(eval_rows) + bool(held)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4))
    loss = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    ips = [(r["step"], r["img_per_s"]) for r in rows if r.get("img_per_s") is not None]
    if loss:
        axes[0].plot(*zip(*loss), lw=1)
    axes[0].set_title("training loss")
    axes[0].set_xlabel("step")
    if ips:
        axes[1].plot(*zip(*ips), lw=1, color="C1")
    waits = [(r["step"], r["data_wait_ms"]) for r in rows if r.get("data_wait_ms") is not None]
    gcs = [(r["step"], r["gc_ms"]) for r in rows if r.get("gc_ms") is not None]
    if waits or gcs:  # host time per step waiting for a batch (a data stall) or in Python's collector
        twin = axes[1].twinx()
        if waits:
            twin.plot(*zip(*waits), lw=1, ls="--", color="C3")
        if gcs:
            twin.plot(*zip(*gcs), lw=1, ls=":", color="C6")
        twin.set_ylabel("host ms/step: data wait (dashed), GC (dotted)", color="C3", fontsize=8)
        twin.set_ylim(bottom=0)
    axes[1].set_title("throughput (images/s)")
    axes[1].set_xlabel("step")
    if eval_rows:
        axes[2].plot(*zip(*eval_rows), marker="o", color="C2")
        axes[2].set_title("periodic eval: mean AUC")
        axes[2].set_xlabel("step")
    if held:  # GPU runs: a hold that climbs at a steady allocation is the allocator's fragmentation
        ax = axes[-1]
        ax.plot(*zip(*held), lw=1, color="C4", label="held by the allocator")
        alloc = [(r["step"], r["gpu_alloc_gib"]) for r in rows if r.get("gpu_alloc_gib") is not None]
        if alloc:
            ax.plot(*zip(*alloc), lw=1, ls="--", color="C5", label="allocated")
        ax.set_ylim(0, 1.15 * max(v for _, v in held + alloc))  # headroom: a flat hold would sit on the frame
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title("GPU memory per GPU, peak (GiB)")
        ax.set_xlabel("step")
    fig.suptitle(f"{run.name} — {run.model} ({run.objective})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- text


def _f(v, d=4):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def slopes_markdown(result: dict) -> str:
    objs = list(result["objectives"])
    if not objs:
        return "No run has an evaluation for this method: run `python -m engine.eval RUN_DIR --data DIR` first.\n"
    tasks = ["mean"] + sorted({t for d in result["objectives"].values() for t in d["fits"] if t != "mean"})
    lines = ["| task | " + " | ".join(f"{o} slope (R²)" for o in objs) + " |", "|---|" + "---|" * len(objs)]
    for t in tasks:
        cells = []
        for o in objs:
            fit = result["objectives"][o]["fits"].get(t)
            cells.append(f"{fit['slope']:+.4f} ({fit['r2']:.2f})" if fit else "no fit")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    notes = [d["note"] for d in result["objectives"].values() if d["note"]]
    return "\n".join(lines) + "\n" + "".join(f"\n_{n}._\n" for n in notes)


def _record_mean(rec: dict) -> float:
    vals = [_auc(rec, t) for t in rec["tasks"]]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def report_markdown(runs: list[Run], result: dict, curves: dict[str, str | None]) -> str:
    method = result["method"]
    lines = ["# Scaling report", "", f"Probe: **{method}**. AUC = c · params^slope fitted in log-log per objective.",
             "", "## Runs", "", "| run | model | objective | params | step | mean AUC | curves |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        rec = r.evals.get(method)
        lines.append(
            f"| {r.name} | {r.model} | {r.objective} | {f'{r.params / 1e6:.1f}M' if r.params else '?'} | "
            f"{rec.get('step') if rec else '—'} | {_f(_record_mean(rec)) if rec else 'not evaluated'} | "
            f"{Path(curves[r.name]).name if curves.get(r.name) else 'no metrics'} |"
        )
    lines += ["", "## Slopes", "", slopes_markdown(result), "![scaling](scaling.png)", ""]
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="report", help="output folder (default ./report)")
    p.add_argument("--method", choices=["linear", "knn"], default="linear")
    args = p.parse_args(argv)
    try:
        runs = [load_run(r) for r in args.runs]
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seen: dict[str, int] = {}
    for r in runs:  # unique names for files
        if r.name in seen:
            r.name = f"{r.path.parent.name}_{r.name}"
        seen[r.name] = 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = scaling(runs, args.method)
    plot_scaling(result, out / "scaling.png")
    curves = {}
    for r in runs:
        c = plot_curves(r, out / f"{r.name}_curves.png")
        curves[r.name] = str(c) if c else None
    record = {**result, "runs": [{"run": str(r.path), "model": r.model, "objective": r.objective, "params": r.params,
                                   "evaluated": args.method in r.evals, "curves": curves[r.name]} for r in runs]}
    (out / "scaling.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
    (out / "scaling.md").write_text(slopes_markdown(result))
    (out / "report.md").write_text(report_markdown(runs, result, curves))
    print(slopes_markdown(result))
    for d in result["objectives"].values():
        if d["note"]:
            print(d["note"], file=sys.stderr)
    print(f"wrote {out}/report.md, scaling.png, scaling.json and {sum(1 for c in curves.values() if c)} curve plot(s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
