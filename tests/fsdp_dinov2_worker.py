"""Run under torchrun by tests/test_engine_distributed.py: DINOv2 under FSDP2 (gloo, Triton
kernels in the interpreter) with the student's crops packed into one pass and with one pass per
crop size, and packed with LayerScale's fold off; rank 0 writes the losses of the same 2 steps. LayerScale
starts at 0.5 (timm's DINOv2 ViTs: 1e-5), so that its gamma weighs in the losses."""
import json
import os
import sys

import torch

from engine.config import load_config
from engine.models import LayerScaleLinear
from engine.train import Trainer, teardown_distributed
from tests.engine_helpers import DINOV2_TINY


def run(pack: bool, out_dir: str, fold: bool = True) -> dict:
    cfg = load_config("recipes/quickstart_dinov2.yaml", DINOV2_TINY + [
        "objective.dinov2.encoder_kwargs={embed_dim: 32, depth: 2, num_heads: 2, init_values: 0.5}",
        "data.shards=synthetic", "train.device=cpu", "model.kernels=triton", "train.batch_size=4",
        "train.steps=10", "log.progress=false", "log.tensorboard=false", f"objective.dinov2.pack_crops={pack}",
        f"model.fold_layerscale={fold}"])
    t = Trainer(cfg, out_dir, out=open(os.devnull, "w"))
    folded = sum(isinstance(m, LayerScaleLinear) and m.fold_layerscale for m in t.model.modules())
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
    return {"losses": losses, "packed_calls": len(calls), "folded": folded}


if __name__ == "__main__":
    out = sys.argv[1]
    res = {"packed": run(True, out + "/a"), "per_size": run(False, out + "/b"),
           "unfolded": run(True, out + "/c", fold=False)}
    if torch.distributed.get_rank() == 0:
        json.dump(res, open(out + "/result.json", "w"))
    teardown_distributed()
