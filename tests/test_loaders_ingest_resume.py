"""Killing `python -m loaders.ingest` midway and rerunning it gives the same samples as an
uninterrupted run: same uids, same image bytes, same order, no duplicates."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ingest_fixtures import read_shards, small_corpus  # noqa: E402

from loaders.ingest import SourceSpec, ingest  # noqa: E402
from loaders.ingest.__main__ import main as cli_main  # noqa: E402

SHARD_SIZE = "4kb"  # several shards per part, so a killed part leaves finished shard files behind
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(src: str, out: str, *extra: str, env_extra: dict | None = None, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LOADERS_INGEST_KILL_AFTER", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "loaders.ingest", src, "--name", "small", "--out", out, "--workers", "2",
           "--chunk-size", "2", "--shard-size", SHARD_SIZE, "--quiet", *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def run_inproc(src: str, out: str, workers: int = 2, **options) -> dict:
    """The same job as run_cli, in this process (the CLI's start-up costs seconds of imports)."""
    return ingest([SourceSpec(path=src, name="small")], out, workers=workers, chunk_size=2, shard_size=SHARD_SIZE,
                  progress=False,
                  **options)


def contents(out: str) -> list[tuple[str, bytes, str]]:
    return [(s["uid"], s["image"], json.dumps(s["meta"], sort_keys=True)) for s in read_shards(out)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("src"))
    small_corpus(src)
    out = str(tmp_path_factory.mktemp("clean") / "out")
    run_inproc(src, out)
    return src, out, contents(out)


def test_clean_run_is_deterministic_across_worker_counts(clean, tmp_path):
    src, out, ref = clean
    uids = [u for u, _, _ in ref]
    assert len(uids) == len(set(uids)) == 10 + 3 + 12  # 10 PNG, 3 DICOM, 12 non-empty NIfTI slices
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert [s["path"] for s in manifest["skipped"]] == ["png/bad.png"] and manifest["resumed"] is False
    run_inproc(src, str(tmp_path / "one"), workers=1)
    assert contents(str(tmp_path / "one")) == ref


def _ingest_then_exit(src: str, out: str) -> None:
    run_inproc(src, out)
    os._exit(0)


def test_killed_midway_then_rerun_matches_clean_run(clean, tmp_path, monkeypatch):
    src, _, ref = clean
    out = str(tmp_path / "out")
    # SIGKILL from inside after 12 samples: part 0 (2 DICOMs) done, part 1 (a DICOM and the
    # NIfTI's slices) half-written. A forked process: no seconds of imports as with the CLI.
    monkeypatch.setenv("LOADERS_INGEST_KILL_AFTER", "12")
    proc = multiprocessing.get_context("fork").Process(target=_ingest_then_exit, args=(src, out))
    proc.start()
    proc.join(120)
    monkeypatch.delenv("LOADERS_INGEST_KILL_AFTER")
    assert proc.exitcode == -signal.SIGKILL
    done = sorted(os.listdir(os.path.join(out, "done")))
    assert done == ["part-00000.json"]
    partial = os.listdir(os.path.join(out, "part-00001"))  # the interrupted part: shards, no index
    assert any(f.endswith(".mds") for f in partial) and "index.json" not in partial
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    manifest = run_inproc(src, out)  # the rerun: same job, so it resumes
    assert manifest["resumed"] is True and manifest["samples"] == len(ref)
    assert manifest == json.load(open(os.path.join(out, "manifest.json")))
    assert contents(out) == ref
    # A third run finds everything done and changes nothing.
    run_inproc(src, out)
    assert contents(out) == ref


def test_external_sigkill_then_rerun_matches_clean_run(clean, tmp_path):
    src, _, ref = clean
    out = str(tmp_path / "out")
    proc = run_cli(src, out, wait=False)
    deadline = time.time() + 120
    first_done = os.path.join(out, "done", "part-00000.json")
    # A real kill from outside, at whatever point the run has reached.
    while not os.path.exists(first_done) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # wherever it is now: mid-part, between parts, or already done
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run_inproc(src, out)
    assert contents(out) == ref


def test_rerun_with_other_options_refuses_then_overwrites(clean, tmp_path):
    src, out, ref = clean
    assert cli_main([src, "--name", "small", "--out", out, "--chunk-size", "2", "--shard-size", SHARD_SIZE,
                    "--quality", "80", "--quiet"]) == 2
    with pytest.raises(FileExistsError, match="overwrite"):
        run_inproc(src, out, quality=80)
    other = str(tmp_path / "q80")
    run_inproc(src, other, quality=80)
    assert [u for u, _, _ in contents(other)] == [u for u, _, _ in ref]
    assert contents(other) != ref  # different JPEG bytes


def test_a_worker_dying_on_one_file_skips_only_that_file(clean, tmp_path, monkeypatch):
    src, _, ref = clean
    monkeypatch.setenv("LOADERS_INGEST_CRASH_ON", "png/003.png")  # the worker SIGKILLs itself there
    manifest = run_inproc(src, str(tmp_path / "out"))
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"png/bad.png", "png/003.png"} and "worker process died" in reasons["png/003.png"]
    assert contents(str(tmp_path / "out")) == [r for r in ref if r[0] != "small/png/003.png"]
