"""engine.report: reads run dirs, fits AUC = c · params^slope per objective, writes PNGs and tables."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.report import load_run, main, power_law_fit

PNG = b"\x89PNG\r\n\x1a\n"
TASK_SLOPES = {"pathmnist": 0.02, "chestmnist": 0.01, "breastmnist": 0.03}


def fake_run(root: Path, name: str, model: str, objective: str, params: int, step: int = 100, with_eval=True) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  name: {model}\n  img_size: 224\nobjective:\n  name: {objective}\n")
    rows = [{"step": s, "epoch": s // 10, "loss": 2.0 / (1 + s), "lr": 1e-3, "img_per_s": 900.0 + s,
             "data_wait_ms": 0.1 * (s % 5), "time": float(s)} for s in range(1, 31)]
    rows.append({"step": 30, "epoch": 3, "eval/pathmnist/auc": 0.7, "eval/chestmnist/auc": 0.6})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows)
                                       + "\n{\"step\": 31, \"lo")  # torn last line
    if with_eval:
        tasks = {t: {"auc": 0.5 * params**s, "acc": 0.5, "n_test": 10} for t, s in TASK_SLOPES.items()}
        for st, scale in ((step // 2, 0.9), (step, 1.0)):  # an older eval must be ignored
            rec = {"method": "linear", "model": model, "objective": objective, "params": params,
                   "step": f"step_{st:08d}",
                   "tasks": {t: {**m, "auc": m["auc"] * scale} for t, m in tasks.items()},
                   "mean_auc": None}
            (run / "eval" / f"linear_step_{st:08d}.json").write_text(json.dumps(rec))
    return run


def test_power_law_fit_recovers_slope():
    ps = [5.7e6, 22e6, 86e6, 304e6]
    fit = power_law_fit(ps, [0.6 * p**0.015 for p in ps])
    assert fit["slope"] == pytest.approx(0.015, abs=1e-9)
    assert 10 ** fit["intercept"] == pytest.approx(0.6, rel=1e-6) and fit["r2"] == pytest.approx(1.0)
    assert power_law_fit([86e6, 86e6], [0.7, 0.8]) is None  # one size: nothing to fit


def test_report_fits_each_objective_and_task(tmp_path):
    runs = [
        fake_run(tmp_path, "mae_t", "vit_tiny_patch16_224", "mae", 5_524_416),
        fake_run(tmp_path, "mae_s", "vit_small_patch16_224", "mae", 21_665_664),
        fake_run(tmp_path, "mae_b", "vit_base_patch16_224", "mae", 85_798_656),
        fake_run(tmp_path, "dino_b", "vit_base_patch16_224", "dinov2", 85_798_656),
    ]
    out = tmp_path / "report"
    assert main([*map(str, runs), "--out", str(out)]) == 0
    res = json.loads((out / "scaling.json").read_text())
    mae = res["objectives"]["mae"]
    for task, slope in TASK_SLOPES.items():
        assert mae["fits"][task]["slope"] == pytest.approx(slope, abs=1e-6)
    assert 0.01 < mae["fits"]["mean"]["slope"] < 0.03
    assert [p["run"] for p in mae["points"]] == ["mae_t", "mae_s", "mae_b"]
    assert res["objectives"]["dinov2"]["fits"]["mean"] is None
    assert "no power-law fit" in res["objectives"]["dinov2"]["note"]
    for f in ["scaling.png", "mae_t_curves.png", "dino_b_curves.png"]:
        assert (out / f).read_bytes()[:8] == PNG
    md = (out / "scaling.md").read_text()
    assert "| pathmnist | +0.0200" in md and "no fit" in md
    assert "mae_b" in (out / "report.md").read_text()


def test_report_with_one_run_says_no_fit(tmp_path, capsys):
    run = fake_run(tmp_path, "only", "vit_tiny_patch16_224", "mae", 5_524_416)
    out = tmp_path / "r1"
    assert main([str(run), "--out", str(out)]) == 0
    assert "no power-law fit" in capsys.readouterr().err
    assert (out / "scaling.png").read_bytes()[:8] == PNG and (out / "only_curves.png").is_file()
    assert json.loads((out / "scaling.json").read_text())["objectives"]["mae"]["fits"]["mean"] is None


def test_load_run_counts_params_without_eval_and_skips_torn_lines(tmp_path):
    import timm

    run = load_run(fake_run(tmp_path, "noeval", "vit_tiny_patch16_224", "mae", 1, with_eval=False))
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    assert run.params == sum(p.numel() for p in m.parameters())
    assert run.evals == {} and len(run.metrics) == 31
    newest = load_run(fake_run(tmp_path, "ev", "vit_tiny_patch16_224", "mae", 1000))
    assert newest.evals["linear"]["step"] == "step_00000100"
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_curves_add_a_gpu_memory_panel_where_the_run_logged_it(tmp_path, monkeypatch):
    """plot_curves: a run whose log lines carry gpu_mem_gib / gpu_alloc_gib (GPU runs) gets a fourth panel with both;
    a CPU run's figure keeps three."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.report import plot_curves

    run_dir = fake_run(tmp_path, "gpu", "vit_tiny_patch16_224", "mae", 5_000_000)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()[:-1]]
    for r in lines:
        if "loss" in r:
            r.update(gpu_mem_gib=40.0 + r["step"] / 10, gpu_alloc_gib=30.0)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    figures = []
    real = plt.subplots

    def spy(*a, **k):
        fig, axes = real(*a, **k)
        figures.append(axes)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    assert plot_curves(load_run(run_dir), tmp_path / "gpu.png").read_bytes()[:8] == PNG
    axes = figures[-1]
    assert len(axes) == 4 and axes[-1].get_title() == "GPU memory per GPU, peak (GiB)"
    assert len(axes[-1].get_lines()) == 2  # held and allocated
    assert plot_curves(load_run(fake_run(tmp_path, "cpu", "vit_tiny_patch16_224", "mae", 5_000_000)),
                       tmp_path / "cpu.png") is not None
    assert len(figures[-1]) == 3
