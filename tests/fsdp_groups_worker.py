"""Run under torchrun by tests/test_engine_distributed.py: the same 3 training steps with FSDP2
per block (resharding after forward) and with 4-block groups kept gathered (the big recipes'
defaults); rank 0 writes the shard groups each made and the losses and weights they reach."""
import json
import os
import sys

import torch

from engine.config import load_config
from engine.train import Trainer, teardown_distributed
from tests.engine_helpers import TINY


def run(extra: list[str], out_dir: str) -> dict:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    cfg = load_config("recipes/quickstart.yaml", TINY + ["data.shards=synthetic", "train.device=cpu",
                                                          "optim.clip_grad=1.0", *extra])
    t = Trainer(cfg, out_dir, out=open(os.devnull, "w"))
    sharded = [m for m in t.model.modules() if isinstance(m, FSDPModule)]
    groups = {id(fully_shard.state(m)._fsdp_param_group) for m in sharded}
    data = t.batches()
    losses = []
    for _ in range(3):
        t.set_lr()
        loss, _, _ = t.train_step([next(data)])
        losses.append(float(loss))
    weight = t.model.encoder.blocks[5].mlp.fc1.weight.full_tensor()
    return {"groups": len(groups), "losses": losses, "checksum": float(weight.double().sum()),
            "norm": float(weight.double().norm())}


if __name__ == "__main__":
    out = sys.argv[1]
    res = {
        "per_block": run(["train.fsdp_blocks_per_group=1", "train.fsdp_reshard_after_forward=true"], out + "/a"),
        "grouped": run(["train.fsdp_blocks_per_group=4", "train.fsdp_reshard_after_forward=false"], out + "/b"),
    }
    if torch.distributed.get_rank() == 0:
        json.dump(res, open(out + "/result.json", "w"))
    teardown_distributed()
