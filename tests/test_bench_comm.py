"""`python -m bench comm` needs several CUDA devices; elsewhere it says so and exits 2."""
from __future__ import annotations

import torch

from bench import comm


def test_comm_refuses_without_enough_gpus(capsys):
    if torch.cuda.device_count() >= 2:
        return  # the real measurement is for a GPU machine, not the test suite
    assert comm.main(["--gpus", "2"]) == 2
    assert "needs 2 CUDA devices" in capsys.readouterr().err
