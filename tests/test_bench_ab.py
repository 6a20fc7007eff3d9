"""bench ab: the interleaving of the two settings, its summary, and a whole run on CPU (tiny DINOv2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.common
from bench import ab
from tests.engine_helpers import DINOV2_TINY

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_interleave_alternates_and_times_each_block():
    log, state = [], {"v": None}

    def step():
        log.append(state["v"])

    def sync():
        log.append("sync")

    times = ab.interleave(step, lambda v: state.update(v=v), blocks=3, steps=2, warmup=1, sync=sync)
    assert len(times[True]) == len(times[False]) == 3
    # warm-up: one step with each setting, then rounds: [untimed, sync, 2 timed, sync] per setting, order alternating
    assert log[:2] == [True, False]
    blocks = [log[i:i + 5] for i in range(2, len(log), 5)]
    assert [b[0] for b in blocks] == [True, False, False, True, True, False]
    assert all(b == [b[0], "sync", b[0], b[0], "sync"] for b in blocks)


def test_summarize_ratio_and_separation():
    s = ab.summarize({True: [10.0, 11.0, 10.5], False: [12.0, 10.8, 13.0]}, batch=8)
    assert s["speedup_on"] == pytest.approx((35.8 / 3) / 10.5)
    assert s["on_img_s"] == pytest.approx(8 / 10.5e-3)
    assert s["on_blocks_beating_all_off"] == 2  # 10.0 and 10.5 are below every off block (min 10.8); 11.0 is not
    assert s["off_blocks_beating_all_on"] == 0


def test_ab_runs_a_tiny_dinov2_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    args = ["--recipe", str(RECIPES / "quickstart_dinov2.yaml"), "--batch", "2", "--switch", "fused_ce",
            "--blocks", "2", "--steps", "1", "--warmup", "1", "--kernels", "torch", "--out-dir", str(tmp_path / "run"),
            "--tag", "t", "--override", "model.compile=false", *DINOV2_TINY]
    assert ab.main(args) == 0
    (path,) = tmp_path.glob("ab-*-quickstart-dinov2-fused-ce-t.json")
    rec = json.loads(path.read_text())
    (row,) = rec["rows"]
    assert row["switch"] == "fused_ce" and row["batch"] == 2 and row["modules_switched"] == 1
    assert len(row["on_block_ms"]) == len(row["off_block_ms"]) == 2 and row["speedup_on"] > 0
    assert rec["command"].startswith("python -m bench ab --recipe")


def test_ab_refuses_a_switch_the_objective_lacks(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    with pytest.raises(SystemExit):
        ab.main(["--recipe", str(RECIPES / "quickstart_dinov2.yaml"), "--batch", "2", "--switch", "no_such_flag",
                 "--kernels", "torch", "--out-dir", str(tmp_path / "run"), "--override", "model.compile=false",
                 *DINOV2_TINY])
    assert not list(tmp_path.glob("ab-*.json"))


def test_ab_switches_every_module_holding_the_attribute(tmp_path, monkeypatch):
    """A switch on modules: PatchMatmul's matmul, in the student's and the teacher's patch embeddings at once."""
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    args = ["--recipe", str(RECIPES / "quickstart_dinov2.yaml"), "--batch", "2", "--switch", "matmul",
            "--blocks", "1", "--steps", "1", "--warmup", "0", "--kernels", "torch", "--out-dir", str(tmp_path / "run"),
            "--override", "model.compile=false", "model.patch_matmul=true", *DINOV2_TINY]
    assert ab.main(args) == 0
    (path,) = tmp_path.glob("ab-*-matmul.json")
    assert json.loads(path.read_text())["rows"][0]["modules_switched"] == 2
