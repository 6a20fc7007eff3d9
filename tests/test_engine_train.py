import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.train import Trainer, TrainingStopped, cosine_lr
from tests.engine_helpers import TINY, phantom_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return phantom_shards(tmp_path_factory.mktemp("data"))


def make(tmp_path, shards, *extra) -> Trainer:
    cfg = load_config(None, TINY + [f"data.shards={shards}", "run.name=t", *extra])
    return Trainer(cfg, tmp_path / "run", out=open("/dev/null", "w"))


def params(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_train_writes_metrics_config_and_checkpoint(tmp_path, shards):
    callbacks = len(__import__("gc").callbacks)
    t = make(tmp_path, shards)
    result = t.fit()
    assert result["complete"] and t.step == 6
    run = tmp_path / "run"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in rows)
    # time in Python's collector: per step since the last line, and its longest pause (a step makes enough objects
    # for young collections to run), with the callback gone after the run
    assert all(r["gc_ms"] >= 0 and r["gc_max_ms"] >= 0 for r in rows) and sum(r["gc_max_ms"] for r in rows) > 0
    assert callbacks == len(__import__("gc").callbacks)
    # host ms per step spent waiting in next(batch): present, and a fraction of the logging interval
    assert all(0 <= r["data_wait_ms"] * 2 <= (r["time"] - prev) * 1e3
               for r, prev in zip(rows, [0] + [x["time"] for x in rows]))
    assert (run / "config.yaml").is_file()
    latest = (run / "checkpoints" / "LATEST").read_text().strip()
    assert latest == "step_00000006"
    assert (run / "checkpoints" / latest / "encoder.safetensors").is_file()
    assert len(list((run / "checkpoints").glob("step_*"))) == 2  # keep=2: steps 3 and 6


def test_resume_is_exact(tmp_path, shards):
    """6 steps straight == 4 steps, stop, resume for the remaining 2 (model, optimizer, data, RNG)."""
    a = make(tmp_path / "a", shards)
    a.fit()
    b = make(tmp_path / "b", shards)
    b.fit(stop_after=4)
    assert b.step == 4
    c = make(tmp_path / "b", shards)  # a new process would do exactly this
    c.fit()
    assert c.resumed_from is not None and c.resumed_from.name == "step_00000004"
    pa, pc = params(a), params(c)
    for k in pa:
        assert torch.equal(pa[k], pc[k]), k
    sa, sc = a.optimizer.state_dict()["state"], c.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sc[i]["exp_avg"]) for i in sa)


def test_resume_keeps_the_pred_layout(tmp_path, shards):
    """A run keeps the pixel order its decoder head was trained in: resuming with the other pred_layout is an
    error that names the setting (nothing trained); a checkpoint saved before the setting existed counts as MAE's
    pqc order; the same layout resumes."""
    make(tmp_path, shards, "objective.mae.pred_layout=pqc").fit(stop_after=2)
    with pytest.raises(ValueError, match="objective.mae.pred_layout=pqc"):
        make(tmp_path, shards, "objective.mae.pred_layout=cpq").fit()
    assert "pred_layout: pqc" in (tmp_path / "run" / "config.yaml").read_text()  # the run's record is untouched
    ok = make(tmp_path, shards, "objective.mae.pred_layout=pqc")
    assert ok.fit()["complete"] and ok.resumed_from.name == "step_00000002"
    t = make(tmp_path / "old", shards)
    with pytest.raises(ValueError, match="pred_layout=pqc"):  # the default (cpq) against a pre-setting checkpoint
        t._check_resumed_config(Path("step_1"), {"objective": {"name": "mae", "mae": {"mask_ratio": 0.75}}})
    t._check_resumed_config(Path("step_1"), {"objective": {"name": "mae", "mae": {"pred_layout": "cpq"}}})
    assert t.cfg.objective.mae.pred_layout == "cpq"  # the default


def test_rerun_of_finished_run_does_nothing(tmp_path, shards):
    make(tmp_path, shards).fit()
    again = make(tmp_path, shards)
    again.maybe_resume()
    before = params(again)
    assert again.fit()["complete"]
    assert again.step == 6
    after = params(again)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing trained again


def test_nonfinite_loss_skips_update_and_stops(tmp_path, shards):
    t = make(tmp_path, shards, "train.max_nonfinite=3", "train.steps=20")
    real_forward = t.model.forward

    def poisoned(images):
        out = real_forward(images)
        return {"loss": out["loss"] * float("nan")}

    t.model.forward = poisoned
    before = params(t)
    with pytest.raises(TrainingStopped, match="consecutive steps had a non-finite loss"):
        t.fit()
    after = params(t)
    assert all(torch.equal(before[k], after[k]) for k in before)  # every update was skipped
    assert int(t.nonfinite_total) >= 3


def test_gradient_accumulation_matches_large_batch(tmp_path, shards):
    """micro_batch 4 x 2 accumulation == one batch of 8 with the same data."""
    torch.manual_seed(0)
    one = make(tmp_path / "one", shards, "train.steps=1")
    two = make(tmp_path / "two", shards, "train.steps=1", "train.micro_batch=4")
    assert (two.micro_batch, two.accum_steps) == (4, 2)
    two.model.load_state_dict(one.model.state_dict())
    images = one.model.synthetic_batch(8, "cpu")
    from loaders import Batch

    def b(x):
        return Batch(x, [""] * len(x), [""] * len(x), [""] * len(x))

    torch.manual_seed(3)
    noise = torch.rand(8, 16)
    import kernels

    orig = kernels.mae_mask
    chunks = iter([noise, noise[:4], noise[4:]])
    kernels.mae_mask = lambda *a, **k: orig(*a, noise=next(chunks), **{kk: v for kk, v in k.items() if kk != "noise"})
    try:
        one.set_lr(); one.train_step([b(images)])
        two.set_lr(); two.train_step([b(images[:4]), b(images[4:])])
    finally:
        kernels.mae_mask = orig
    for (k, p1), p2 in zip(one.model.state_dict().items(), two.model.state_dict().values()):
        assert torch.allclose(p1, p2, atol=1e-6, rtol=1e-4), k


def test_cuda_graph_accumulation_survives_overwritten_graph_memory(tmp_path, shards):
    """Under CUDA graphs each replay writes its gradients into memory the graph owns. With accumulation the
    step copies each micro-batch's gradients out before the next replay (Trainer._take_grads), so the
    step's gradient is the sum even when the first micro-batch's gradient memory is overwritten. Simulated
    on CPU: the second forward zeroes the tensors the first backward handed to .grad, as a replay would.
    The plain accumulation path under the same overwrite loses the first micro-batch (the control)."""
    from loaders import Batch

    def b(x):
        return Batch(x, [""] * len(x), [""] * len(x), [""] * len(x))

    torch.manual_seed(0)
    cpu = ("train.device=cpu", "train.steps=1", "train.micro_batch=4")  # a CPU simulation, on a GPU machine too
    ref = make(tmp_path / "ref", shards, *cpu)
    images = ref.model.synthetic_batch(8, "cpu")
    state = {k: v.clone() for k, v in ref.model.state_dict().items()}

    def run(graphs: bool, overwrite: bool):
        t = make(tmp_path / f"g{graphs}{overwrite}", shards, *cpu)
        t.model.load_state_dict(state)
        t.graphs = graphs  # the copy-out path, as under model.compile_mode=reduce-overhead
        handed, calls = [], [0]
        hooks = [p.register_post_accumulate_grad_hook(lambda p: handed.append(p.grad)) for p in t.params]
        forward = t.model.forward

        def replay(x):
            if calls[0] == 1 and overwrite:
                for g in handed:
                    g.zero_()
            calls[0] += 1
            return forward(x)

        t.model.forward = replay
        torch.manual_seed(5)  # the same masking noise in every run
        t.set_lr()
        t.train_step([b(images[:4]), b(images[4:])])
        for h in hooks:
            h.remove()
        return {k: v.clone() for k, v in t.model.state_dict().items()}

    plain = run(graphs=False, overwrite=False)
    graphed = run(graphs=True, overwrite=True)
    assert all(torch.equal(plain[k], graphed[k]) for k in plain)  # the same sums, bit for bit
    broken = run(graphs=False, overwrite=True)
    assert not all(torch.equal(plain[k], broken[k]) for k in plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bench/gpu_session.sh T1 runs it")
def test_cuda_graph_accumulation_on_gpu(tmp_path, shards):
    """On a GPU: the whole-model MAE step replayed as CUDA graphs with 2 micro-batches per step trains to
    the same parameters as torch's default compile mode (same compiled kernels, no graphs)."""
    runs = {}
    for mode in ("default", "reduce-overhead"):
        torch.manual_seed(0)
        t = make(tmp_path / mode, shards, "train.device=cuda", "model.compile=true", f"model.compile_mode={mode}",
                 "train.micro_batch=4", "train.steps=4", "data.workers=0")
        assert t.accum_steps == 2 and t.graphs == (mode == "reduce-overhead")
        t.fit()
        assert (t._grad_acc is not None) == t.graphs  # the copy-out path ran under graphs only
        runs[mode] = params(t)
    for k, v in runs["default"].items():
        assert torch.allclose(v, runs["reduce-overhead"][k], rtol=1e-3, atol=1e-5), k


def test_cosine_schedule():
    assert cosine_lr(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, shards, monkeypatch):
    from engine import checkpoint as ckpt

    t = make(tmp_path, shards, "train.steps=3", "checkpoint.every_steps=100")
    t.fit()
    good = ckpt.latest_checkpoint(tmp_path / "run")
    t.step = 99

    def crash(*a, **k):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", crash)  # dies mid-save, after the sharded part
    with pytest.raises(OSError):
        t.save()
    assert ckpt.latest_checkpoint(tmp_path / "run") == good
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_cli_runs_then_resumes(tmp_path, shards):
    args = [sys.executable, "-m", "engine.run", "recipes/quickstart.yaml", *TINY, f"data.shards={shards}",
            f"run.dir={tmp_path / 'run'}"]
    r1 = subprocess.run(args + ["--stop-after-steps", "3"], cwd=ROOT, capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr
    assert "paused at step 3" in r1.stderr
    r2 = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr
    assert "resuming from" in r2.stderr and "step_00000003" in r2.stderr
    assert "finished at step 6" in r2.stderr


def test_periodic_eval_logs_auc(tmp_path, shards):
    from tests.test_engine_eval import write_easy

    data = tmp_path / "medmnist"
    data.mkdir()
    write_easy(data / "pathmnist.npz", sizes=(60, 20, 30))
    t = make(tmp_path, shards, f"eval.data={data}", "eval.every_steps=3", "eval.tasks=[pathmnist]",
             "eval.method=knn")
    t.fit()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/pathmnist/auc" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0.0 <= r["eval/pathmnist/auc"] <= 1.0 for r in evals)


def test_data_options_reach_the_backend_in_use(tmp_path, shards):
    from engine.config import ConfigError

    trainer = make(tmp_path, shards, "data.options={cpu: {prefetch_factor: 3}, dali: {hw_decoder_load: 0.5}}")
    assert trainer.loader.backend == "cpu" and trainer.loader.prefetch_factor == 3  # dali's entry is not passed
    with pytest.raises(ValueError, match="data.options.cpu"):
        make(tmp_path / "b", shards, "data.options={cpu: {no_such_setting: 1}}")
    with pytest.raises(ConfigError, match="unknown backend 'dalli'"):
        load_config(None, TINY + [f"data.shards={shards}", "data.options={dalli: {max_ahead: 3}}"])
    with pytest.raises(ConfigError, match="must map a backend"):
        load_config(None, TINY + [f"data.shards={shards}", "data.options={cpu: 3}"])


def test_cuda_graph_mode_compiles_the_whole_model_and_marks_each_step(tmp_path, shards, monkeypatch):
    """model.compile_mode=reduce-overhead: the whole MAE model is compiled in that mode and every
    optimizer step starts a new CUDA-graph step (so the last step's graph outputs may be reused).
    The compile itself is recorded, not run: CUDA graphs need a GPU (measured with bench loaders)."""
    modes, marks = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append((type(self).__name__, kw)))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    t = make(tmp_path, shards, "model.compile=true", "model.compile_mode=reduce-overhead", "train.steps=3",
             "checkpoint.every_steps=10")
    assert modes == [("MaskedAutoencoder", {"mode": "reduce-overhead"})]
    assert t.fit()["complete"] and len(marks) == 3
    t2 = make(tmp_path / "b", shards, "model.compile=true", "train.steps=2", "checkpoint.every_steps=10")
    assert modes[-1] == ("MaskedAutoencoder", {"mode": None}) and not t2.graphs


def test_allocator_setting_follows_train_allocator(monkeypatch):
    """train.allocator: auto takes expandable segments for DINOv2 (its iBOT tensors change size every step) unless the
    teacher replays a CUDA graph, the default for MAE; set both ways on a CUDA device (a process may build several
    trainers), left alone on the CPU and where the user's environment names expandable_segments."""
    from engine.config import ConfigError
    from engine.train import expandable_segments_wanted, set_allocator

    mae = load_config(ROOT / "recipes" / "quickstart.yaml")
    dino = load_config(ROOT / "recipes" / "quickstart_dinov2.yaml")
    graphed = load_config(ROOT / "recipes" / "quickstart_dinov2.yaml", ["objective.dinov2.teacher_graph=true"])
    assert mae.train.allocator == "auto"
    assert not expandable_segments_wanted(mae) and expandable_segments_wanted(dino)
    assert not expandable_segments_wanted(graphed)
    assert expandable_segments_wanted(load_config(ROOT / "recipes" / "quickstart.yaml", ["train.allocator=expandable"]))
    assert not expandable_segments_wanted(load_config(ROOT / "recipes" / "quickstart_dinov2.yaml",
                                                      ["train.allocator=default"]))
    with pytest.raises(ConfigError, match="train.allocator"):
        load_config(ROOT / "recipes" / "quickstart.yaml", ["train.allocator=big"])

    calls, deprecated = [], []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", deprecated.append, raising=False)
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    cuda = torch.device("cuda", 0)
    assert set_allocator(dino, cuda) is True and set_allocator(mae, cuda) is False
    assert calls == ["expandable_segments:True", "expandable_segments:False"]
    assert deprecated == []  # torch's own setter, not the wrapper that warns it is deprecated
    monkeypatch.delattr(torch._C, "_accelerator_setAllocatorSettings")
    assert set_allocator(dino, cuda) is True and deprecated == ["expandable_segments:True"]  # an older torch
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    assert set_allocator(dino, torch.device("cpu")) is None
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert set_allocator(dino, cuda) is None and len(calls) == 2  # the user's choice stands


def test_log_lines_carry_the_gpu_memory_since_the_last_line(monkeypatch):
    """memory_since_last_line: on CUDA the allocator's peak hold and peak allocated since the last log line (GiB), then
    a fresh peak; nothing on the CPU."""
    from engine.train import memory_since_last_line

    assert memory_since_last_line(torch.device("cpu")) == {}
    peaks = {"reserved": 3 * 2**30, "allocated": 2**30}
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peaks["reserved"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: peaks.update(reserved=0, allocated=0))
    cuda = torch.device("cuda", 0)
    assert memory_since_last_line(cuda) == {"gpu_mem_gib": 3.0, "gpu_alloc_gib": 1.0}
    assert memory_since_last_line(cuda) == {"gpu_mem_gib": 0.0, "gpu_alloc_gib": 0.0}  # reset after each line


def test_gc_is_frozen_once_after_the_set_step(tmp_path, shards, monkeypatch):
    """train.gc_freeze_after=K: after the process's K-th step, one collection and gc.freeze(), once; auto (null) is off
    on the CPU, 3 on CUDA; a negative count is refused. Garbage in cycles is collected first, not frozen."""
    import gc
    import weakref

    import engine.train

    assert make(tmp_path / "a", shards).gc_freeze_after == 0
    with pytest.raises(ValueError, match="gc_freeze_after"):
        make(tmp_path / "b", shards, "train.gc_freeze_after=-1")
    t = make(tmp_path / "c", shards, "train.gc_freeze_after=2")
    calls = []
    real = engine.train.freeze_gc
    monkeypatch.setattr(engine.train, "freeze_gc", lambda: (calls.append(t.steps_here), real()))
    batch = next(t.batches())

    class Node:
        pass

    gc.unfreeze()
    try:
        t.train_step([batch])
        assert gc.get_freeze_count() == 0 and calls == []
        t.train_step([batch])
        assert calls == [2] and gc.get_freeze_count() > 0
        for _ in range(2):
            t.train_step([batch])
        assert calls == [2]  # once, not at every step after
        gc.unfreeze()
        gc.disable()  # no automatic pass: only freeze_gc's own collection can free the cycle
        garbage = Node()
        garbage.me = garbage
        dead = weakref.ref(garbage)
        del garbage
        real()
        assert dead() is None
    finally:
        gc.enable()
        gc.unfreeze()


def test_gc_pauses_are_put_down_to_the_step_they_ran_in():
    """GcPauses: every collection while active is counted by generation and timed (take(): total and longest since the
    last take); those of at least min_ms are listed with the step the caller had counted; none are seen after exit."""
    import gc

    from engine.train import GcPauses

    class Cycle:
        def __init__(self):
            self.me = self

    with GcPauses(min_ms=0.0) as g:
        g.step = 3
        for _ in range(2000):
            Cycle()
        gc.collect()
        g.step = 5
        gc.collect(1)
    assert g.counts[2] >= 1 and g.counts[1] >= 1
    assert (3, 2) in [(s, gen) for s, gen, _ in g.pauses] and (5, 1) in [(s, gen) for s, gen, _ in g.pauses]
    assert all(ms >= 0 for _, _, ms in g.pauses)
    total, longest = g.take()
    assert total >= longest >= max(ms for _, _, ms in g.pauses) - 0.01 and g.take() == (0.0, 0.0)
    n = len(g.pauses)
    gc.collect()
    assert len(g.pauses) == n and g.total_ms == 0.0  # after exit: nothing seen
