"""engine.optim.ShardLocalAdamW: torch's fused AdamW, stepped on FSDP2's local shards."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.optim import ShardLocalAdamW

ROOT = Path(__file__).resolve().parents[1]


def test_local_step_is_torchs_fused_adamw_bit_for_bit():
    """step_local on plain tensors (the path FSDP2 takes, over each shard) against torch.optim.AdamW(fused=True): two
    groups with their own lr and weight decay, a parameter without a gradient, a skipped step (found_inf = 1 leaves
    parameters, moments and the step count), an lr as a tensor; parameters and state equal bit for bit."""
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (6,)]
    start = [torch.randn(s) for s in shapes]
    sets = [[torch.nn.Parameter(t.clone()) for t in start] for _ in range(2)]

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.05}, {"params": ps[2:], "weight_decay": 0.0, "lr": 2e-3}]

    ref = torch.optim.AdamW(groups(sets[0]), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    ours = ShardLocalAdamW(groups(sets[1]), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(6):
        grads = [torch.randn(s) for s in shapes]
        for ps, opt in zip(sets, (ref, ours)):
            for p, g in zip(ps, grads):
                p.grad = None if p is ps[3] and step < 2 else g.clone()
            opt.found_inf = torch.tensor(1.0 if step == 4 else 0.0)
            if step == 5:
                opt.param_groups[0]["lr"] = torch.tensor(5e-4)
            ref.step() if opt is ref else ours.step_local()
    for a, b in zip(*sets):
        assert torch.equal(a, b)
    for a, b in zip(*sets):
        sa, sb = ref.state[a], ours.state[b]
        assert sorted(sa) == sorted(sb) == ["exp_avg", "exp_avg_sq", "step"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa) and sa["step"].dtype == sb["step"].dtype
    assert float(ours.state[sets[1][0]]["step"]) == 5.0  # 6 steps, one skipped
    assert float(ours.state[sets[1][3]]["step"]) == 3.0  # no gradient for 2 of them: no step
    assert not torch.equal(sets[1][0], start[0])


def test_plain_parameters_take_torchs_own_step(monkeypatch):
    """Without DTensor parameters (one GPU, the CPU) step() is torch's AdamW.step, untouched."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = ShardLocalAdamW([p], lr=0.1)
    monkeypatch.setattr(ShardLocalAdamW, "step_local", lambda self: (_ for _ in ()).throw(AssertionError("local")))
    p.grad = torch.ones(3)
    opt.step()
    assert opt.defaults["fused"] and float(opt.state[p]["step"]) == 1.0 and bool((p < 1).all())


def test_fsdp2_step_runs_on_the_shards_and_matches_torch(tmp_path):
    """Two gloo ranks, FSDP2: the fused op sees only local tensors, parameters / moments / step counts equal torch's
    fused AdamW over the DTensors bit for bit (a skipped step among six), and our step leaves no DTensorSpec alive
    (torch 2.11's own step kept one more per parameter each step, 10 here; 2.14's keeps none). The gradient norm and
    its clipping on the shards agree with torch's clip_grad_norm_, and the teacher EMA's lerp over the shards with
    the lerp over the DTensors."""
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "tests" / "optim_worker.py"), str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["moved"] and res["params_equal"] and res["state_equal"]
    assert res["dtensor_args"] == [False] * 12  # two groups, six steps
    ref_norms, our_norms = res["norms"]
    assert our_norms == pytest.approx(ref_norms, rel=1e-6) and min(our_norms) > 0.05
    clip_ref, clip_ours, clipped_norm = res["clip"]  # a norm above 0.05, clipped to 0.05 alike
    assert clip_ours == pytest.approx(clip_ref, rel=1e-6) and clip_ref > 0.1
    assert res["clip_close"] and clipped_norm == pytest.approx(0.05, rel=1e-4)
    assert res["ema_local"] and res["ema_equal"]
    after_torch, after_ours = res["specs"]
    assert all(o <= t for t, o in zip(after_torch[2:], after_ours[2:])), res["specs"]  # ours adds none
    assert after_ours[-1] <= after_ours[2] + (after_torch[-1] - after_torch[2]), res["specs"]


@pytest.mark.parametrize("prefix", ["0", "1"])
def test_bench_torch_dtensor_paths_switch(prefix):
    """bench/torch_dtensor_paths (gpu_session.sh G1's A/B): with BIOVFM_PREFIX=1 the names engine.train and DINOv2 use
    are torch's DTensor paths again (the optimizer never takes the local step); without it, engine.optim's."""
    code = ("import engine.train as t, engine.objectives.dinov2 as d; "
            "print(t.clip_grad_norm.__name__, t.ShardLocalAdamW._takes_local_step.__name__, d.paired_locals.__name__, "
            "t.ShardLocalAdamW._takes_local_step(None) if t.ShardLocalAdamW._takes_local_step.__name__ == '<lambda>' "
            "else '-')")
    env = {**os.environ, "BIOVFM_PREFIX": prefix,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "bench" / "torch_dtensor_paths"), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    last = out.stdout.strip().splitlines()[-1]
    if prefix == "1":
        assert "patched back" in out.stdout and last == "_torch_clip <lambda> <lambda> False"
    else:
        assert last == "clip_grad_norm _takes_local_step paired_locals -"
