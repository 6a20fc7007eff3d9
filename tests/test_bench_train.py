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
