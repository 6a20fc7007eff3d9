"""Run under torchrun by tests/test_engine_distributed.py: DINOv2 under FSDP2 (gloo, Triton
kernels in the interpreter) with the student's crops packed into one pass and with one pass per
crop size; rank 0 writes the losses of the same 2 steps."""
import json
import os
import sys

import torch

from engine.config import load_config
from engine.train import Trainer, teardown_distributed
from tests.engine_helpers import DINOV2_TINY


def run(pack: bool, out_dir: str) -> dict:
    cfg = load_config("recipes/quickstart_dinov2.yaml", DINOV2_TINY + [
        "data.shards=synthetic", "train.device=cpu", "model.kernels=triton", "train.batch_size=4",
        "train.steps=10", "log.progress=false", "log.tensorboard=false", f"objective.dinov2.pack_crops={pack}"])
    t = Trainer(cfg, out_dir, out=open(os.devnull, "w"))
    calls = []
    inner = t.model.forward_packed
    t.model.forward_packed = lambda *a: (calls.append(1), inner(*a))[1]
    data = t.batches()
    losses = []
    for _ in range(2):
        t.set_lr()
        torch.manual_seed(100 + len(losses))  # same iBOT masks in both runs
        loss, _, _ = t.train_step([next(data)])
        losses.append(float(loss))
    return {"losses": losses, "packed_calls": len(calls)}


if __name__ == "__main__":
    out = sys.argv[1]
    res = {"packed": run(True, out + "/a"), "per_size": run(False, out + "/b")}
    if torch.distributed.get_rank() == 0:
        json.dump(res, open(out + "/result.json", "w"))
    teardown_distributed()
