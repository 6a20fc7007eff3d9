"""`python -m bench loaders` runs end to end on a CPU with tiny settings: every requested
backend gets a row (an unavailable one records its error instead of stopping the run),
the PIL baseline and the ratios are there, and the MAE stall section is filled in."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import bench.common
import bench.loaders
from loaders.backends.dali import default_threads


def test_bench_loaders_tiny_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    backends = ["nvjpeg", "pil", "dali"]
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        backends.remove("dali")
    stall_backends = ["pil"] + (["dali"] if "dali" in backends else ["cpu"])
    rc = bench.loaders.main(["--tiny", "--workers", "1", "--backends", ",".join(backends), "--images", "48",
                             "--stall", "--stall-backends", ",".join(stall_backends), "--stall-repeats", "2",
                             "--stall-engine", "--stall-accum", "2",
                             "--data-dir", str(tmp_path / "data")])
    assert rc == 0
    (result,) = tmp_path.glob("loaders-*.json")
    out = json.loads(result.read_text())
    rows = {r["backend"]: r for r in out["throughput"]}
    assert set(rows) == set(backends)
    assert "not available" in rows["nvjpeg"]["error"]  # needs CUDA: recorded, the run goes on
    for name in set(backends) - {"nvjpeg"}:
        r = rows[name]
        assert r["img_s"] > 0 and r["images"] >= 8 and r["cpu_cores"] > 0
        assert r["shape"] == [8, 3, 32, 32]
    assert out["shards"]["64"]["rows"] == 48
    if "dali" in rows:
        assert "dali/pil 64px w1" in out["ratios"]
        # 48 rows = 6 batches per epoch: boundaries fall in the window; DALI's producer split is recorded
        assert rows["dali"]["epochs_started"] >= 1 and "epoch_boundary_ms" in rows["dali"]
        assert rows["dali"]["decoder_ms"]["run_ms"] > 0
    stall, *gpu_stall = out["stall"]
    assert stall["backend"] == "pil" and stall["real_img_s"] > 0 and stall["stall"] < 1
    assert len(stall["pairs"]) == 2  # --stall-repeats: synthetic and real alternate, the median pair is the row's
    assert stall["stall"] in [p["stall"] for p in stall["pairs"]]
    assert stall["stall_range"] == [min(p["stall"] for p in stall["pairs"]), max(p["stall"] for p in stall["pairs"])]
    assert out["stall_model"]["synthetic_img_s"] > 0
    # --stall-engine: engine.run's Trainer with synthetic data, then with each engine backend asked (not pil)
    engine_rows = {r["backend"]: r for r in out["engine_stall"]}
    assert set(engine_rows) == {"synthetic", *stall_backends} - {"pil"}
    assert all(r["img_s"] > 0 and r["data_wait_ms"] >= 0 and r["accum"] == 2 for r in engine_rows.values())
    assert all("stall" in r for b, r in engine_rows.items() if b != "synthetic")
    assert [r["backend"] for r in gpu_stall] == stall_backends[1:]
    for row in (r for r in gpu_stall if r["backend"] == "dali"):  # CPU-only here: prefetch waits per pair
        assert row["loader_priority"] == "normal" and "error" not in row
        assert [p["prefetch"]["items"] for p in row["pairs"]] == [1, 1]  # --tiny: one timed step per run
    assert list(tmp_path.glob("loaders-*.png"))


def test_stall_profile_digest_by_stream():
    """bench loaders --stall-profile: kernel time per step by CUDA stream, busy time as the union of
    a stream's intervals (overlaps counted once), the busiest stream first in the summary."""
    from bench.loaders import stream_summary

    ev = [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 10, "args": {"stream": 7}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 20, "dur": 10, "args": {"stream": 7}},
        {"ph": "X", "cat": "kernel", "name": "dali::resize", "ts": 5, "dur": 4, "args": {"stream": 21}},
        {"ph": "X", "cat": "kernel", "name": "dali::cmn", "ts": 7, "dur": 4, "args": {"stream": 21}},  # overlaps
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 12, "dur": 2, "args": {"stream": 21}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 3},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 4, "dur": 5},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaFree", "ts": 9, "dur": 4000},
    ]
    out = stream_summary(ev, steps=2, wall=0.001)
    # runtime calls of all threads, costliest first: [name, calls/step, ms/step, longest ms]
    assert out["runtime_api"] == [["cudaFree", 0.5, 2.0, 4.0], ["cudaLaunchKernel", 1.0, 0.004, 0.005]]
    assert "cudaFree 0.5 2.00 4.00" in out["summary"]
    assert out["wall_ms_per_step"] == 0.5
    assert out["streams"]["7"]["busy_ms_per_step"] == 0.01  # 20 us over 2 steps
    assert out["streams"]["21"]["busy_ms_per_step"] == 0.004  # 6 us of kernels (5..11) + 2 us copy
    assert out["streams"]["21"]["kernels_per_step"] == 1.5
    assert out["summary"].index("stream 7") < out["summary"].index("stream 21")


def test_stall_profile_gaps_split_by_what_ended_them():
    """The training stream's idle gaps: one closed right after a loader-stream op ended (data
    wait), one with nothing ending on other streams (host wait), launch spacing ignored."""
    from bench.loaders import stream_summary

    def k(ts, dur, stream, name="k"):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    ev = [k(0, 100, 7), k(105, 100, 7),  # 5 us launch spacing: not a gap
          k(400, 100, 7),                # 195 us gap, closed 10 us after the loader's copy ended at 390
          k(700, 100, 7),                # 200 us gap, nothing ends on another stream near 700
          k(300, 90, 21, "copy")]
    g = stream_summary(ev, steps=1, wall=0.001)["gaps"]
    assert g["gaps_per_step"] == 2
    assert abs(g["idle_ms_per_step"] - 0.395) < 1e-9
    assert abs(g["data_wait_ms_per_step"] - 0.195) < 1e-9
    assert abs(g["host_wait_ms_per_step"] - 0.2) < 1e-9


def test_repeats_report_the_median_run_and_nvjpeg_variants(tmp_path):
    """--repeats: every variant runs once per round; tables, ratios and the plot use the median run of
    each (variant, size, workers), all runs kept. --nvjpeg-ahead 1,0 runs nvjpeg twice, labelled."""
    rows = [{"backend": "dali", "variant": "dali", "size": 256, "workers": 2, "repeat": i, "img_s": x}
            for i, x in enumerate([31e3, 18e3, 27e3])]
    rows += [{"backend": "pil", "variant": "pil", "size": 256, "workers": 2, "repeat": i, "img_s": x}
             for i, x in enumerate([900.0, 1000.0])]
    rows += [{"backend": "nvjpeg", "variant": "nvjpeg", "size": 256, "workers": 2, "repeat": 0, "error": "boom"}]
    med = {r["variant"]: r for r in bench.loaders.medians(rows)}
    assert med["dali"]["img_s"] == 27e3 and med["dali"]["runs"] == [31e3, 18e3, 27e3]
    assert med["pil"]["img_s"] == 900.0  # the lower middle of an even count
    assert med["nvjpeg"]["error"] == "boom"  # no run succeeded: the failure stays visible
    assert bench.loaders.ratios(rows) == {"dali/pil 256px w2": 30.0}
    a = bench.loaders.parse(["--nvjpeg-ahead", "1,0", "--repeats", "3"])
    assert a.repeats == 3
    got = [(b, label, o) for b, label, o in bench.loaders.variants(a, ["nvjpeg", "pil"])]
    assert got == [("nvjpeg", "nvjpeg ahead", {"nvjpeg": {"decode_ahead": True}}),
                   ("nvjpeg", "nvjpeg inline", {"nvjpeg": {"decode_ahead": False}}), ("pil", "pil", {})]
    d = bench.loaders.parse(["--dali-streams", "single,backend"])
    assert [o.get("stream_policy") for o in bench.loaders.dali_options(d)] == ["single", "backend"]
    assert [label for _, label, _ in bench.loaders.variants(d, ["dali"])] == [
        "dali t4 hw1 nocopy q3 streams=single", "dali t4 hw1 nocopy q3 streams=backend"]
    one = bench.loaders.parse([])
    assert bench.loaders.variants(one, ["nvjpeg"]) == [("nvjpeg", "nvjpeg", {"nvjpeg": {"decode_ahead": False}})]
    engine = bench.loaders.engine_options(a, torch.device("cpu"), tmp_path / "run", "/shards", "nvjpeg")
    assert "data.options={nvjpeg: {decode_ahead: true}}" in engine  # the first value of --nvjpeg-ahead
    crop = bench.loaders.parse(["--dali-decode-crop", "1,0", "--dali-threads", "2"])
    assert [label for _, label, _ in bench.loaders.variants(crop, ["dali"])] == [
        "dali t2 hw1 nocopy q3 decode-crop", "dali t2 hw1 nocopy q3"]
    assert [o.get("decode_crop", False) for o in bench.loaders.dali_options(crop)] == [True, False]
    engine = bench.loaders.engine_options(crop, torch.device("cpu"), tmp_path / "run", "/shards", "dali")
    def dali_opts(engine):  # the dali entry of the data.options override, parsed
        found = [yaml.safe_load(o.split("=", 1)[1]) for o in engine if o.startswith("data.options=")]
        return found[0]["dali"] if found else {}

    assert dali_opts(engine)["decode_crop"] is True  # the first value of --dali-decode-crop
    threads = default_threads()  # DaliLoader's default: passed only when it differs
    assert dali_opts(engine).get("dali_threads", 2) == 2 and ("dali_threads" in dali_opts(engine)) == (threads != 2)
    plain = dali_opts(bench.loaders.engine_options(one, torch.device("cpu"), tmp_path, "/s", "dali"))
    # the bench's 4 threads, where that is not the default
    assert plain == ({} if threads == 4 else {"dali_threads": 4})
    huff = bench.loaders.parse(["--dali-huffman", "0,1000000", "--hw-decoder-load", "0.9"])
    assert [label for _, label, _ in bench.loaders.variants(huff, ["dali"])] == [
        "dali t4 hw0.9 nocopy q3 huff0", "dali t4 hw0.9 nocopy q3 huff1000000"]
    assert bench.loaders.dali_options(huff)[0]["hybrid_huffman_threshold"] == 0
    assert "hybrid_huffman_threshold" not in bench.loaders.dali_options(one)[0]
    pipes = bench.loaders.parse(["--dali-pipelines", "1,2", "--dali-threads", "2"])
    assert [label for _, label, _ in bench.loaders.variants(pipes, ["dali"])] == [
        "dali t2 hw1 nocopy q3", "dali t2 hw1 nocopy q3 p2"]
    assert [o.get("pipelines", 1) for o in bench.loaders.dali_options(pipes)] == [1, 2]
    two = bench.loaders.parse(["--dali-pipelines", "2,1"])  # the engine stall takes the first combination
    assert dali_opts(bench.loaders.engine_options(two, torch.device("cpu"), tmp_path, "/s", "dali"))["pipelines"] == 2
    accum = bench.loaders.parse(["--stall-accum", "3", "--batch-size", "8"])
    engine = bench.loaders.engine_options(accum, torch.device("cpu"), tmp_path / "run", "/shards", None)
    assert "train.batch_size=24" in engine and "train.micro_batch=8" in engine  # 3 micro-batches per step


def test_epoch_boundaries_measure_the_extra_gap():
    """Batches every 10 ms, the two epochs' first batches 60 ms and 40 ms late: a boundary costs 50 ms on
    average; boundaries at the window's first batch (no gap before it) or outside it are not counted."""
    gaps = [10.0] * 20
    gaps[6] += 60  # before batch 7
    gaps[13] += 40  # before batch 14
    arrivals = [0.0]
    for g in gaps:
        arrivals.append(arrivals[-1] + g / 1e3)
    out = bench.loaders.epoch_boundaries(arrivals, [0, 7, 14, 40])
    assert out["epochs_started"] == 2
    assert out["batch_gap_ms"] == pytest.approx(10.0)
    assert out["epoch_boundary_ms"] == pytest.approx(50.0)
    assert bench.loaders.epoch_boundaries(arrivals, [0]) == {"epochs_started": 0}


def test_bench_shard_sets_are_reused_only_when_they_match(tmp_path):
    """--data-dir keeps the shard sets; the next run reuses a set of the same size, rows and distinct images
    (deterministic images) and rebuilds any other, or one whose build never finished."""
    first = bench.loaders.build_shards(tmp_path, 32, 20, 4, 1)
    index = tmp_path / "jpeg32" / "index.json"
    stamp = index.stat().st_mtime_ns
    again = bench.loaders.build_shards(tmp_path, 32, 20, 4, 1)
    assert again["reused"] and again["mean_kb"] == first["mean_kb"] and index.stat().st_mtime_ns == stamp
    more = bench.loaders.build_shards(tmp_path, 32, 24, 4, 1)
    assert "reused" not in more and more["rows"] == 24
    assert json.loads(index.read_text())["shards"] and sum(
        s["samples"] for s in json.loads(index.read_text())["shards"]) == 24
    (tmp_path / "jpeg32" / "bench-shards.json").unlink()  # as if the build was cut short
    assert "reused" not in bench.loaders.build_shards(tmp_path, 32, 24, 4, 1)


def test_dali_pipes_probe_on_cpu(tmp_path, monkeypatch, capsys):
    """bench._dali_pipes (several DALI pipelines side by side, the decode side alone) runs on DALI's CPU decoder:
    one row per configuration and round, every pipeline delivering images, the record saying what ran; a bad
    --configs is refused."""
    pytest.importorskip("nvidia.dali")
    from bench import _dali_pipes

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    argv = ["--device", "cpu", "--configs", "1x1,2x1", "--seconds", "0.2", "--batch", "4", "--size", "64",
            "--crop", "32", "--rounds", "1"]
    assert _dali_pipes.main(argv) == 0
    (path,) = tmp_path.glob("loaders-dali-pipes-*.json")
    out = json.loads(path.read_text())
    assert [(r["pipelines"], r["threads"]) for r in out["rows"]] == [(1, 1), (2, 1)]
    assert all(len(r["per_pipeline"]) == r["pipelines"] and min(r["per_pipeline"]) > 0 for r in out["rows"])
    assert out["command"].startswith("python -m bench._dali_pipes --device cpu") and out["batch"] == 4
    with pytest.raises(SystemExit):
        _dali_pipes.main(["--device", "cpu", "--configs", "2by2"])
    assert "PIPESxTHREADS" in capsys.readouterr().err
