"""bench train's pieces that run anywhere: the profiler summary, and the naive-MAE baseline."""
from __future__ import annotations

import torch

from bench.train import profile_steps


def test_profile_steps_reports_phases_and_writes_tables(tmp_path):
    from torch.profiler import record_function

    w = torch.randn(64, 64, requires_grad=True)

    def step():
        with record_function("train_step/forward"):
            loss = (torch.randn(32, 64) @ w).square().mean()
        with record_function("train_step/backward"):
            loss.backward()

    path = tmp_path / "prof.txt"
    summary = profile_steps(step, torch.device("cpu"), str(path), "cpu test", n=2)
    assert summary["wall_ms"] > 0
    assert summary["forward_host_ms"] > 0 and summary["backward_host_ms"] > 0
    text = path.read_text()
    assert text.startswith("# cpu test") and "aten::mm" in text


def test_engine_variant_accumulates_micro_batches(monkeypatch):
    """--accum K: each timed step is K micro-batches of --batch (the engine's accumulation), counted in img/s."""
    from bench.train import run_engine
    from engine.config import load_config
    from engine.train import Trainer
    from tests.engine_helpers import TINY

    seen = []
    real = Trainer.train_step

    def counting(self, micro_batches):
        seen.append((len(micro_batches), self.accum_steps, len(micro_batches[0].images)))
        return real(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", counting)
    cfg = load_config(None, TINY + ["model.kernels=torch", "run.name=bench-accum"])
    out = run_engine(cfg, batch=4, steps=2, warmup=1, accum=3)
    assert out["accum"] == 3 and out["img_per_s"] > 0
    assert seen and set(seen) == {(3, 3, 4)}


def test_device_gaps_put_idle_time_down_to_the_launching_host_op():
    """device_gaps on a hand-made trace of 2 steps: kernels on two streams (overlapping: no gap), a gap before a kernel
    launched through the runtime inside a nested host op (the innermost op is named), one before a copy launched through
    the driver, one too short to count, and one whose launch is missing."""
    from bench.train import device_gaps, gap_table

    def op(name, ts, dur, tid=1, cat="cpu_op"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}

    def dev(name, ts, dur, corr, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    def launch(ts, corr, cat="cuda_runtime", tid=1):
        return {"ph": "X", "cat": cat, "name": "launch", "ts": ts, "dur": 2, "tid": tid, "args": {"correlation": corr}}

    events = [
        op("train_step/forward", 0, 1000, cat="user_annotation"), op("aten::mm", 5, 10), launch(8, 1),
        dev("gemm", 20, 100, 1),
        dev("other_stream", 50, 100, 2), launch(30, 2),  # overlaps gemm and ends at 150
        op("vfm::attn_fwd", 200, 300), op("aten::empty", 210, 5), launch(400, 3),
        dev("_attn_fwd", 450, 50, 3),  # gap 150 -> 450: 300 us, launched inside vfm::attn_fwd (not aten::empty)
        op("aten::copy_", 600, 50, tid=2), launch(640, 4, cat="cuda_driver", tid=2),
        dev("Memcpy HtoD", 700, 10, 4, cat="gpu_memcpy"),  # gap 500 -> 700: 200 us, the driver launch on thread 2
        dev("tiny_gap", 713, 7, 5),  # 3 us after: below min_gap_us
        dev("orphan", 800, 20, 99),  # gap 80 us, no launch event
    ]
    g = device_gaps(events, steps=2)
    assert g["span_ms"] == (820 - 20) / 2e3 and g["idle_ms"] == (300 + 200 + 80) / 2e3
    assert g["busy_ms"] == (100 + 100 + 50 + 10 + 7 + 20) / 2e3
    assert [(r["host_op"], r["idle_ms"], r["gaps"]) for r in g["by_host_op"]] == [
        ("vfm::attn_fwd", 0.15, 0.5), ("aten::copy_", 0.1, 0.5), ("(launch not found)", 0.04, 0.5)]
    assert [x["next"] for x in g["largest"]] == ["_attn_fwd", "Memcpy HtoD", "orphan"]
    text = gap_table(g)
    assert "idle 0.29 ms" in text and "vfm::attn_fwd" in text.splitlines()[2]
    assert device_gaps([op("aten::mm", 0, 5)], steps=1)["idle_ms"] == 0.0  # no device activity (a CPU run)


def test_recipe_entries_carry_their_own_overrides(monkeypatch, tmp_path):
    """`--recipes PATH PATH::key=value`: one process, the second entry with its own override on top of --override;
    the rows keep the entries, the plot labels name the override."""
    import json

    import pytest

    import bench.common
    from bench.train import entry_label, load_entry, main

    cfg = load_entry("recipes/quickstart.yaml::train.micro_batch=4::model.drop_path=0.1", ["train.micro_batch=8"])
    assert cfg.train.micro_batch == 4 and cfg.model.drop_path == 0.1  # the entry's own override wins
    assert entry_label("r.yaml::model.activation_checkpointing=false::train.micro_batch=8", "vit_g") == \
        "vit_g\nactivation_checkpointing=false\nmicro_batch=8"
    with pytest.raises(SystemExit, match="key=value"):
        load_entry("recipes/quickstart.yaml::oops", [])

    import bench.train

    released = []
    monkeypatch.setattr(bench.train, "release_memory", lambda device: released.append(device.type))
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    assert main(["--recipes", "recipes/quickstart.yaml", "recipes/quickstart.yaml::train.micro_batch=2",
                 "--variants", "engine-torch", "--steps", "1", "--warmup", "1", "--no-compile",
                 "--override", "data.shards=synthetic", f"run.dir={tmp_path}/runs", "--tag", "t"]) == 0
    (result,) = tmp_path.glob("train-*-t.json")
    assert result.name.endswith("-tiny-t.json"), result.name  # the model named once in the file name
    rows = json.loads(result.read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["recipes/quickstart.yaml", "recipes/quickstart.yaml::train.micro_batch=2"]
    assert [r["batch"] for r in rows][1] == 2 and rows[0]["batch"] != 2
    assert all(r["engine-torch_img_s"] > 0 for r in rows)
    assert len(released) == 2  # after each variant: the next one's memory figures start from an empty allocator


def test_release_memory_drops_compiled_code(monkeypatch):
    """release_memory resets torch.compile's state (its cudagraph trees hold a memory pool until then): a function
    compiled before it compiles again after it."""
    from bench.train import release_memory

    compiles = []

    def backend(gm, inputs):
        compiles.append(1)
        return gm.forward

    f = torch.compile(lambda x: x * 2 + 1, backend=backend)
    x = torch.randn(8)
    f(x)
    f(x)
    assert len(compiles) == 1
    release_memory(torch.device("cpu"))
    f(x)
    assert len(compiles) == 2


def test_scaling_mode_accumulates_under_torchrun(monkeypatch, tmp_path):
    """`--gpus N --accum K` (CPU ranks over gloo here): the torchrun workers run K micro-batches a step, as a run
    does (gradients reduced once, on the last), so a scaling figure is not charged a reduction per micro-batch.
    The row also holds every timed step's time and, with --profile, each rank's profile summary."""
    import json

    import bench.common
    import bench.train
    from bench.train import main

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench.train, "RESULTS_PROFILE_DIR", tmp_path / "profiles")
    assert main(["--recipes", "recipes/quickstart.yaml", "--gpus", "2", "--accum", "2", "--batch", "4",
                 "--steps", "3", "--warmup", "1", "--no-compile", "--variants", "engine-torch",
                 "--override", "data.shards=synthetic", "--tag", "t", "--profile"]) == 0
    (result,) = tmp_path.glob("train-scaling-*-t.json")
    record = json.loads(result.read_text())
    # the command that wrote it, runnable as recorded (the suite is "train-scaling", the command bench train's)
    assert record["command"].startswith("python -m bench train --recipes recipes/quickstart.yaml --gpus 2 ")
    (row,) = record["rows"]
    assert "error" not in row, row.get("error")
    assert row["gpus"] == 2 and row["accum"] == 2 and row["img_s"] > 0
    each = row["step_ms_each"]
    assert len(each) == 3 and min(each) > 0
    # the mean step time is the timed span over the steps: the steps' own times add up to at most that
    assert sum(each) <= 3 * row["step_ms"] + 0.1
    ranks = row["profile_ms_ranks"]
    assert len(ranks) == 2 and all(r["wall_ms"] > 0 and r["backward_host_ms"] > 0 for r in ranks)
    assert len(row["gc_pauses_ranks"]) == 2 and all(isinstance(p, list) for p in row["gc_pauses_ranks"])
    assert (tmp_path / "profiles" / "quickstart-2gpu-t.txt").exists()


def test_profile_stem_keeps_one_recipes_variants_apart():
    """Scaling mode's profile tables: one recipe given twice with different `::` overrides gets one table each."""
    from bench.train import profile_stem

    recipes = ["recipes/vit_l_dinov2.yaml::model.fold_layerscale=false", "recipes/vit_l_dinov2.yaml",
               "recipes/vit_s_dinov2.yaml"]
    assert [profile_stem(recipes, i) for i in range(3)] == ["vit_l_dinov2-1", "vit_l_dinov2-2", "vit_s_dinov2"]
    assert profile_stem(["recipes/vit_b_mae.yaml"], 0) == "vit_b_mae"



def test_worker_error_keeps_the_ranks_lines_and_the_root_cause():
    """A failed torchrun launch in a scaling row: the rank's own message (here a C++ abort's) and which rank failed
    first survive, however long the launcher's traceback between them; other text keeps its tail."""
    from bench.common import worker_error

    rank = "x" * 3000 + "\nterminate called without an active exception\n"
    launcher = ("Traceback (most recent call last):\n  File \"/site-packages/torch/distributed/run.py\", line 1\n"
                + "    frame\n" * 400 + "ChildFailedError:\nFailures:\n[1]:\n  rank: 1 (SIGTERM)\n"
                + "Root Cause (first observed failure):\n[0]:\n  rank      : 0 (local_rank: 0)\n"
                + "  exitcode  : -6\n===\n")
    e = worker_error(rank + launcher)
    assert len(e) <= 1500
    assert "terminate called without an active exception" in e
    assert "Root Cause" in e and "exitcode  : -6" in e
    assert "frame" not in e
    # a rank's own traceback alone (no launcher's after it) is kept as the tail
    own = "y" * 2000 + "Traceback (most recent call last):\n  File \"bench/train.py\"\nValueError: bad\n"
    assert worker_error(own) == own[-1500:]
