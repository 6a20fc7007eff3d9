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
