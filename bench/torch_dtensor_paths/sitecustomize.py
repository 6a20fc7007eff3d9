# The A/B of engine.optim's FSDP2 DTensor-leak fix (bench/gpu_session.sh G1). Put this folder first on PYTHONPATH and
# set BIOVFM_PREFIX=1: the engine then runs torch's own DTensor paths again, as before engine.optim
# (torch.optim.AdamW(fused=True) stepping DTensors, torch's clip_grad_norm_, DINOv2's teacher EMA on DTensors).
# Python imports sitecustomize at start-up, so torchrun's workers are patched before engine.train binds the names.
import os

if os.environ.get("BIOVFM_PREFIX") == "1":
    import torch
    import engine.optim as eo

    eo.ShardLocalAdamW._takes_local_step = lambda self: False

    def _torch_clip(params, max_norm):
        n = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return n.full_tensor() if eo.DTensor is not None and isinstance(n, eo.DTensor) else n

    eo.clip_grad_norm = _torch_clip
    eo.paired_locals = lambda a, b: (a, b)
    print("[prefix] engine.optim patched back to torch's DTensor paths", flush=True)
