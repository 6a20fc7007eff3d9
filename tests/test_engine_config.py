import subprocess
import sys
from pathlib import Path

import pytest

import engine.plan as engine_plan
from engine.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if not p.name.startswith("_"))


def test_defaults_and_overrides():
    cfg = load_config(ROOT / "recipes" / "vit_b_mae.yaml", ["optim.base_lr=3e-4", "optim.betas=[0.8, 0.9]",
                                                             "model.compile=false"])
    assert cfg.model.name == "vit_base_patch16_224"
    assert cfg.optim.base_lr == pytest.approx(3e-4)
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.compile is False
    assert cfg.objective.mae.decoder_dim == 512  # from the shared base recipe
    assert cfg.run.name == "vit_b_mae"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("no.such.key=1", "unknown key 'no'"),
        ("optim.lr=abc", "optim.lr: expected"),
        ("optim.nope=1", "valid keys: base_lr"),
        ("model.kernels=cuda", "valid: 'auto', 'triton', 'torch'"),
        ("train.batch_size=1.5", "train.batch_size: expected an integer"),
        ("objective.mae.mask_ratio=1.5", "mask_ratio"),
        ("model=3", "expected a section"),
        ("novalue", "key.sub=value"),
        ("model.compile_mode=fast", "expected 'default' | 'reduce-overhead'"),
        ("model.compile_mode=reduce-overhead", "needs model.compile: true"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "recipes" / "quickstart.yaml", [override])
    assert needle in str(e.value)


def test_base_overlay_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {steps: 5}\n")
    (tmp_path / "b.yaml").write_text("train: {steps: 9, seed: 3}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.train.steps, cfg.train.seed) == (5, 3)
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("override", ["no.such.key=1", "optim.lr=abc"])
def test_cli_bad_override_exits_nonzero(override):
    r = subprocess.run([sys.executable, "-m", "engine.run", "recipes/quickstart.yaml", override, "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert override.split("=")[0].split(".")[-1] in r.stderr or override.split(".")[0] in r.stderr
    assert "error:" in r.stderr


@pytest.fixture
def eager_plan_trace(monkeypatch):
    """The plan's activation trace without compiled blocks (_partitioned_blocks), for tests of what a plan says
    rather than of its memory figures: compiling every recipe's blocks costs seconds each."""
    import contextlib

    import engine.plan

    monkeypatch.setattr(engine.plan, "_partitioned_blocks", lambda model: contextlib.nullcontext())


def test_every_recipe_dry_runs(eager_plan_trace):
    """Every recipe validates and plans on a machine with no GPU and no data."""
    from engine.plan import format_plan, make_plan

    assert RECIPES, "no recipes found"
    for recipe in RECIPES:
        cfg = load_config(recipe)
        plan = make_plan(cfg)
        text = format_plan(cfg, plan)
        assert plan.flops_per_image > 0 and plan.encoder_params > 0, recipe
        assert "FLOPs / image" in text


def test_vit_g_dry_run_cli():
    r = subprocess.run([sys.executable, "-m", "engine.run", "recipes/vit_g_mae.yaml", "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert "encoder 1,011.2 M (1.011 B)" in r.stdout
    assert "FLOP" in r.stdout and "80 GB H100" in r.stdout


def test_compile_tuning_becomes_inductor_options():
    """model.compile_tuning: the resolved mode's own inductor options plus coordinate_descent_tuning (torch.compile
    takes a mode or options, not both); the max-autotune modes tune already and keep their mode; off: the mode. A
    compile with those options runs (CPU here)."""
    import torch

    from engine.config import compile_kwargs

    assert compile_kwargs(None, False) == {"mode": None}
    assert compile_kwargs("reduce-overhead", False) == {"mode": "reduce-overhead"}
    assert compile_kwargs(None, True) == {"options": {"coordinate_descent_tuning": True}}
    assert compile_kwargs("default", True) == {"options": {"coordinate_descent_tuning": True}}
    assert compile_kwargs("reduce-overhead", True) == {"options": {"triton.cudagraphs": True,
                                                                   "coordinate_descent_tuning": True}}
    for mode in ("max-autotune", "max-autotune-no-cudagraphs"):
        assert compile_kwargs(mode, True) == {"mode": mode}
    assert load_config(ROOT / "recipes" / "vit_b_mae.yaml", []).model.compile_tuning is False
    assert load_config(ROOT / "recipes" / "vit_l_dinov2.yaml", []).model.compile_tuning is True
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU())
    eager = m(torch.ones(2, 4))
    m.compile(**compile_kwargs(None, True))
    torch.testing.assert_close(m(torch.ones(2, 4)), eager)


def test_auto_compile_mode_picks_cuda_graphs_only_where_they_apply(eager_plan_trace):
    """model.compile_mode: auto (the default) is reduce-overhead for a compiled whole-model step on one
    CUDA device (gradient accumulation included), torch's default mode anywhere else; explicit modes stay."""
    from engine.config import resolve_compile_mode

    assert load_config(ROOT / "recipes" / "vit_b_mae.yaml", []).model.compile_mode == "auto"
    assert load_config(ROOT / "recipes" / "quickstart_dinov2.yaml", []).model.compile_mode == "auto"  # accepted
    ok = dict(compiled=True, whole_model=True, world=1, device_type="cuda")
    assert resolve_compile_mode("auto", **ok) == "reduce-overhead"
    for change in ({"compiled": False}, {"whole_model": False}, {"world": 2}, {"device_type": "cpu"}):
        assert resolve_compile_mode("auto", **(ok | change)) is None, change
    assert resolve_compile_mode("default", **ok) == "default" and resolve_compile_mode(None, **ok) is None
    assert resolve_compile_mode("max-autotune-no-cudagraphs", **(ok | {"world": 2})) == "max-autotune-no-cudagraphs"
    # --dry-run says which the GPU run gets: the recipe's micro-batches per step (4 at 1024) replay graphs too
    from engine.plan import format_plan, make_plan

    cfg = load_config(ROOT / "recipes" / "vit_b_mae.yaml", [])
    assert make_plan(cfg).accum_steps > 1
    for overrides, want in (([], "(auto -> reduce-overhead: CUDA graphs)"),
                            (["train.batch_size=256"], "(auto -> reduce-overhead: CUDA graphs)"),
                            (["model.compile_mode=reduce-overhead"], "compile True (reduce-overhead: CUDA graphs)"),
                            (["model.compile_mode=default"], "compile True (default)")):
        cfg = load_config(ROOT / "recipes" / "vit_b_mae.yaml", overrides)
        assert want in format_plan(cfg, make_plan(cfg)), overrides
    cfg = load_config(ROOT / "recipes" / "vit_l_dinov2.yaml", ["model.compile=true"])
    assert ("(auto -> default, coordinate-descent tuning; auto uses CUDA graphs for a compiled MAE step on one GPU)"
            in format_plan(cfg, make_plan(cfg)))


def test_cuda_graph_compile_mode_is_for_the_whole_model_mae_step():
    """model.compile_mode=reduce-overhead replays the whole MAE step as CUDA graphs: accepted for MAE,
    with gradient accumulation too (the gradients are copied out per micro-batch), refused for DINOv2
    (compiled per block)."""
    base = ["model.compile=true", "model.compile_mode=reduce-overhead"]
    cfg = load_config(ROOT / "recipes" / "quickstart.yaml", base)
    assert cfg.model.compile_mode == "reduce-overhead"
    cfg = load_config(ROOT / "recipes" / "quickstart.yaml", base + ["train.accum_steps=2"])
    assert (cfg.model.compile_mode, cfg.train.accum_steps) == ("reduce-overhead", 2)
    with pytest.raises(ConfigError, match="whole-model MAE step"):
        load_config(ROOT / "recipes" / "quickstart_dinov2.yaml", base)


def test_plan_activations_split_into_fixed_and_per_image():
    """The plan's saved activations grow linearly with the batch from a fixed part (traced at batch 2 and 3, checked
    at 4 and 6: MAE's shapes are linear in the batch), and DINOv2's fixed part holds its heads' weight-normed last
    layers (batch-independent), which were once counted once per image."""
    from engine.plan import _activation_model, _trace, make_plan, measure_model

    cfg = load_config(ROOT / "recipes" / "quickstart.yaml")
    m = measure_model(cfg)
    model, context = _activation_model(cfg)  # as a GPU run takes it (our kernels' ops on the meta device)
    assert m["act_bytes"] > 0
    with context():
        for b in (4, 6):
            assert _trace(model, b)[1] == m["act_fixed_bytes"] + b * m["act_bytes"]
    plan = make_plan(cfg)
    saved = (plan.act_bytes_fixed + 10 * plan.act_bytes_per_image) / 2  # bf16
    assert plan.activation_bytes(10) == pytest.approx(saved * engine_plan.ACTIVATION_WORKING_SET, rel=1e-12)
    assert engine_plan.ACTIVATION_WORKING_SET > 1  # the backward's working set comes on top of what is saved
    assert plan.activation_bytes(10, world=8) == pytest.approx(saved * engine_plan.FSDP_ACTIVATION_WORKING_SET)
    assert plan.memory_per_gpu(world=8)["activations"] > plan.memory_per_gpu(world=1)["activations"]  # FSDP's cache

    # no iBOT masks: their random token counts would blur the split at this tiny size
    dcfg = load_config(ROOT / "recipes" / "quickstart_dinov2.yaml", ["objective.dinov2.mask_probability=0.0"])
    d, o = measure_model(dcfg), dcfg.objective.dinov2
    head_weight = o.dino_prototypes * o.head_bottleneck_dim * 4  # fp32 on the meta device
    assert d["act_fixed_bytes"] >= head_weight, d
    assert d["act_bytes"] > 0


def test_plan_counts_activation_checkpointing():
    """With model.activation_checkpointing, a checkpointed block keeps its input and one block's activations are
    rebuilt at a time: per image, the plan saves (depth - 1) blocks' own activations fewer and depth block inputs more
    than without (each block's own bytes traced here on one block alone); more when only every other block is
    checkpointed; the model's FLOPs unchanged; the dry run says the blocks are checkpointed."""
    import torch

    from engine.plan import _activation_model, format_plan, make_plan, measure_model

    qs = ROOT / "recipes" / "quickstart.yaml"
    base = measure_model(load_config(qs))
    ac = measure_model(load_config(qs, ["model.activation_checkpointing=true"]))
    half = measure_model(load_config(qs, ["model.activation_checkpointing=true", "model.ac_every=2"]))
    model, context = _activation_model(load_config(qs))
    block, params = model.encoder.blocks[0], {id(p) for p in model.parameters()}
    depth, dim, tokens = 12, 192, (64 // 8) ** 2 // 4 + 1  # ViT-T: the kept patches + the class token

    def own_bytes(batch):
        seen, total = set(), [0]

        def pack(t):
            b = t._base if t._base is not None else t
            if id(b) not in params and id(b) not in seen:
                seen.add(id(b))
                total[0] += b.numel() * b.element_size()
            return t
        x = torch.randn(batch, tokens, dim, device="meta", requires_grad=True)
        with context(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x).sum().backward()
        return total[0]

    per_block, per_input = own_bytes(3) - own_bytes(2), tokens * dim * 4
    assert base["act_bytes"] - ac["act_bytes"] == (depth - 1) * per_block - depth * per_input, (base, ac)
    assert ac["act_bytes"] < half["act_bytes"] < base["act_bytes"]
    assert ac["flops"] == base["flops"]  # the model's FLOPs: no recomputation counted
    cfg = load_config(qs, ["model.activation_checkpointing=true"])
    assert "blocks checkpointed" in format_plan(cfg, make_plan(cfg))
    cfg = load_config(qs, ["model.activation_checkpointing=true", "model.ac_every=2"])
    assert "every 2nd block checkpointed" in format_plan(cfg, make_plan(cfg))


def test_plan_names_the_largest_micro_batch_that_fits(monkeypatch):
    """largest_micro_batch: the largest divisor of the per-GPU batch whose estimate stays under the budget (the next
    divisor up does not), None when even 1 does not fit; the dry run names it when it differs from the recipe's."""
    import engine.plan as ep

    cfg = load_config(ROOT / "recipes" / "quickstart.yaml")  # global batch 32
    plan = ep.make_plan(cfg)
    states = plan.memory_per_gpu(world=1)["states"]
    budget = states + plan.activation_bytes(8) + 1
    assert ep.largest_micro_batch(cfg, plan, 1, budget) == 8  # 16 needs more
    assert ep.largest_micro_batch(cfg, plan, 4, budget) == 8  # 8 images a GPU, sharded states: all of them fit
    assert ep.largest_micro_batch(cfg, plan, 3, budget) is None  # 3 GPUs do not divide 32
    assert ep.largest_micro_batch(cfg, plan, 1, states) is None
    monkeypatch.setattr(ep, "H100_USABLE", budget)
    text = ep.format_plan(cfg, plan, [1])
    assert "does NOT fit" in text and "largest micro batch that fits: 8" in text, text


def test_plan_counts_the_graphed_steps_gradient_sums():
    """A compiled MAE step replayed as CUDA graphs on one GPU with more than one micro-batch keeps its gradient sums
    outside the graphs (Trainer._take_grads): one more fp32 copy of the trainable parameters, which the estimate adds
    at every micro batch below the per-GPU batch and nowhere else (one micro-batch a step, FSDP, DINOv2, eager)."""
    import engine.plan as ep

    cfg = load_config(ROOT / "recipes" / "quickstart.yaml", ["model.compile=true", "train.micro_batch=8"])
    plan = ep.make_plan(cfg)
    sums = plan.trainable_params * 4
    assert ep._graph_sum_bytes(cfg, plan, 1) == sums  # 4 micro-batches of 8
    assert ep._graph_sum_bytes(cfg, plan, 1, micro=32) == 0  # the whole batch at once
    assert ep._graph_sum_bytes(cfg, plan, 2) == 0  # FSDP: no graphs
    for overrides in (["model.compile=false", "model.compile_mode=null"],
                      ["model.compile=true", "model.compile_mode=default"]):
        assert ep._graph_sum_bytes(load_config(ROOT / "recipes" / "quickstart.yaml", overrides
                                               + ["train.micro_batch=8"]), plan, 1) == 0, overrides
    base = ep._batch_free_bytes(cfg, plan, 1, micro=32)
    assert ep._batch_free_bytes(cfg, plan, 1) == base + sums
    assert "+ gradient sums" in ep.format_plan(cfg, plan, [1])
    # the largest micro batch pays the sums below the whole batch: a budget that would fit 16 without them (not 32)
    budget = min(base + plan.activation_bytes(16) + sums / 2, base + plan.activation_bytes(32) - 1)
    assert base + plan.activation_bytes(16) < budget
    assert ep.largest_micro_batch(cfg, plan, 1, budget) == 8
    assert ep.largest_micro_batch(cfg, plan, 1, base + plan.activation_bytes(16) + sums + 1) >= 16
    dino = load_config(ROOT / "recipes" / "quickstart_dinov2.yaml", ["model.compile=true"])
    assert ep._graph_sum_bytes(dino, plan, 1, micro=1) == 0  # DINOv2 compiles per block: no whole-step graphs


def test_memory_probe_finds_the_peak_and_who_holds_it():
    """bench._probe_memory replays the allocator's history to the highest allocated total and groups what is live
    then by the first frame of ours (or torch's optimizer, autograd, cudagraph trees) in each block's stack."""
    from bench._probe_memory import live_at_peak, owner

    def frames(*names):
        return [{"filename": f, "line": 1, "name": "f"} for f in names]

    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames("/x/site-packages/torch/optim/adam.py")},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frames("<generated>", "/work/main/engine/train.py")},
        {"action": "free_requested", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "alloc", "addr": 3, "size": 30, "frames": frames("/work/main/kernels/attn.py")},
        {"action": "alloc", "addr": 4, "size": 40, "frames": frames("/work/main/kernels/attn.py")},  # peak: 170
        {"action": "free_completed", "addr": 4, "size": 40},
        {"action": "alloc", "addr": 5, "size": 30, "frames": []},  # 160: below the peak
        {"action": "free_completed", "addr": 5, "size": 30},
    ]
    best, groups, at = live_at_peak({"device_traces": [trace]})
    assert (best, at) == (170, 5)
    assert groups == {"torch/optim/adam.py:1 f": 100, "main/kernels/attn.py:1 f": 70}
    assert owner(frames("<generated>", "/work/main/engine/train.py")) == "main/engine/train.py:1 f"
    assert owner([]) == "(no stack)"


def test_memory_advice_warns_and_names_a_micro_batch():
    """engine.plan.memory_advice: None where the estimate fits the card; a warning naming the estimate, the largest
    micro batch the estimate fits and activation checkpointing where it does not; always a message after an OOM."""
    import engine.plan as ep

    cfg = load_config(ROOT / "recipes" / "quickstart.yaml")  # micro batch 32 on one device
    plan = ep.make_plan(cfg)
    states = plan.memory_per_gpu(world=1)["states"]
    assert ep.memory_advice(cfg, 1, 80e9) is None
    capacity = (states + plan.activation_bytes(8) + 1) / 0.92
    text = ep.memory_advice(cfg, 1, capacity)
    assert text.startswith("micro batch 32 may not fit"), text
    assert "train.micro_batch=8 " in text and "model.activation_checkpointing=true" in text, text
    assert ep.largest_micro_batch(cfg, plan, 1, capacity * 0.92) == 8
    after = ep.memory_advice(cfg, 1, 80e9, failed=True)
    assert after.startswith("CUDA ran out of memory at micro batch 32") and "train.micro_batch" not in after, after


def test_run_reports_an_out_of_memory_error_with_advice(monkeypatch, tmp_path, capsys):
    """engine.run turns a CUDA out-of-memory error into a message with the plan's advice and exit status 1, not a
    traceback."""
    import torch

    import engine.run
    import engine.train

    def oom(self, stop_after=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(engine.train.Trainer, "fit", oom)
    rc = engine.run.main([str(ROOT / "recipes" / "quickstart.yaml"), "data.shards=synthetic", f"run.dir={tmp_path}/run",
                          "log.progress=false"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "error: CUDA ran out of memory at micro batch 32" in err and "resumes from its newest checkpoint" in err
    assert "Tried to allocate 2.00 GiB" in err and "Traceback" not in err


def test_planning_traces_the_gpu_path_on_meta_tensors():
    """kernels.triton_version.planning(): "auto" takes our kernels for meta tensors inside it only, so the plan's
    trace of attention keeps q, k, v, o and the LSE (a GPU run's) and not the [N, N] probabilities (the torch
    path's)."""
    import torch

    import kernels
    from kernels import triton_version

    x = torch.empty(2, 3, 40, 16, device="meta", requires_grad=True)

    def saved_shapes():
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            kernels.attention(x, x, x)
        return shapes

    assert triton_version.resolve("auto", x) == "torch"
    outside = saved_shapes()
    with triton_version.planning():
        assert triton_version.resolve("auto", x) == "triton"
        inside = saved_shapes()
    assert triton_version.resolve("auto", x) == "torch"  # restored
    assert (2, 3, 40, 40) not in inside and (2, 3, 40) in inside, inside  # the LSE, no probabilities
    assert sum(torch.Size(s).numel() for s in inside) < sum(torch.Size(s).numel() for s in outside), (inside, outside)


def test_cli_takes_overrides_after_the_options(capsys):
    """`RECIPE --dry-run --gpus N N key=value` parses as `RECIPE key=value --dry-run --gpus N N` (argparse's plain
    parse stopped the positionals at the first option, and --gpus read the override as a count)."""
    import engine.run

    argv = [str(ROOT / "recipes" / "quickstart.yaml"), "--dry-run", "--gpus", "1", "2", "train.micro_batch=2"]
    assert engine.run.main(argv) == 0
    out = capsys.readouterr().out
    assert "(micro 2)" in out
    assert "2 GPUs" in out and "8 GPUs" not in out


def test_recipe_table_takes_throughput_by_objective_model_and_micro_batch(tmp_path, eager_plan_trace):
    """MAE's and DINOv2's ViT-H share a timm name, and a recipe may be measured at several micro batches: the table
    takes only rows of the recipe's own objective and micro batch (one-GPU scaling rows included)."""
    import json

    from engine.plan import recipe_table

    def result(name, suite, rows):
        (tmp_path / name).write_text(json.dumps({"suite": suite, "card": "NVIDIA H200", "rows": rows}))

    result("train-a.json", "train", [
        {"recipe": "recipes/vit_h_mae.yaml", "model": "vit_huge_patch14_224", "objective": "mae", "batch": 256,
         "engine-triton_img_s": 1384.0, "engine-triton_mfu": 0.4},
        {"recipe": "recipes/vit_h_mae.yaml::train.micro_batch=512", "model": "vit_huge_patch14_224",
         "objective": "mae", "batch": 512, "engine-triton_img_s": 9999.0},
        {"recipe": "recipes/vit_h_dinov2.yaml", "model": "vit_huge_patch14_224", "objective": "dinov2", "batch": 32,
         "engine-triton_img_s": 97.5, "engine-triton_mfu": 0.43}])
    result("train-scaling-b.json", "train-scaling", [
        {"recipe": "recipes/vit_l_dinov2.yaml", "model": "vit_large_patch14_reg4_dinov2", "gpus": 1,
         "batch_per_gpu": 64, "img_s": 207.0, "mfu": 0.45},
        {"recipe": "recipes/vit_l_dinov2.yaml", "model": "vit_large_patch14_reg4_dinov2", "gpus": 2,
         "batch_per_gpu": 64, "img_s": 411.0}])
    recipes = [str(ROOT / "recipes" / f"{r}.yaml") for r in ("vit_h_mae", "vit_h_dinov2", "vit_l_dinov2", "vit_b_mae")]
    lines = {line.split("`")[1]: line for line in recipe_table(recipes, str(tmp_path / "train-*.json")).splitlines()
             if line.startswith("| `")}
    assert "1,384 (measured)" in lines["vit_h_mae.yaml"]  # not the 512 row: the recipe's micro batch is 256
    assert "98 (measured)" in lines["vit_h_dinov2.yaml"]  # not MAE's figure under the same timm name
    assert "207 (measured)" in lines["vit_l_dinov2.yaml"]  # the one-GPU scaling row, not the two-GPU one
    assert "(est.)" in lines["vit_b_mae.yaml"]
    # a scaling row's objective is its recipe's with the entry's own overrides; an unknown recipe gets none
    from engine.plan import _row_objective

    assert _row_objective({"recipe": f"{ROOT}/recipes/quickstart.yaml"}) == "mae"
    assert _row_objective({"recipe": f"{ROOT}/recipes/quickstart.yaml::objective.name=dinov2"}) == "dinov2"
    assert _row_objective({"recipe": f"{ROOT}/recipes/gone.yaml"}) is None


def test_dry_run_names_lighter_checkpointing_that_fits(monkeypatch, capsys):
    """lighter_checkpointing: with checkpointing on, the lightest setting whose estimate fits at the recipe's micro
    batch (none at all, else every k-th block, the largest k), per GPU count; nothing where only the recipe's fits,
    nothing with checkpointing off. The dry run prints it."""
    import engine.plan
    import engine.run
    from engine.plan import _batch_free_bytes, lighter_checkpointing, make_plan, measure_model

    qs = ROOT / "recipes" / "quickstart.yaml"
    on = ["model.activation_checkpointing=true"]
    cfg = load_config(qs, on)
    plan = make_plan(cfg)
    (line,) = lighter_checkpointing(cfg, plan, (1,)).values()
    assert "without checkpointing: model.activation_checkpointing=false" in line and f"micro {plan.micro_batch}" in line

    def total(overrides):  # the 1-GPU estimate at the recipe's micro batch, as the advice computes it
        m = measure_model(load_config(qs, overrides))
        saved = (m["act_fixed_bytes"] + m["act_bytes"] * plan.micro_batch) / 2
        return _batch_free_bytes(cfg, plan, 1) + saved * engine.plan.ACTIVATION_WORKING_SET

    every2, every3 = total(on + ["model.ac_every=2"]), total(on + ["model.ac_every=3"])
    assert every2 < every3 < total([])
    monkeypatch.setattr(engine.plan, "H100_USABLE", (every2 + every3) / 2)  # every 2nd block fits, every 3rd not
    (line,) = lighter_checkpointing(cfg, plan, (1,)).values()
    assert "every 2nd block (6 of 12): model.ac_every=2" in line
    monkeypatch.setattr(engine.plan, "H100_USABLE", every2 * 0.99)
    assert lighter_checkpointing(cfg, plan, (1,)) == {}
    assert "ac_every=2" in lighter_checkpointing(cfg, plan, (1,), budget=(every2 + every3) / 2)[1]  # a card's budget
    off = load_config(qs)
    assert lighter_checkpointing(off, make_plan(off), (1,)) == {}
    # every 5th block checkpoints as many of 12 as every 4th (0, 5, 10 / 0, 4, 8): not lighter, so not named
    cfg4 = load_config(qs, on + ["model.ac_every=4"])
    every4, every11 = total(on + ["model.ac_every=4"]), total(on + ["model.ac_every=11"])
    assert every4 < every11
    assert lighter_checkpointing(cfg4, make_plan(cfg4), (1,), budget=(every4 + every11) / 2) == {}
    (line,) = lighter_checkpointing(cfg4, make_plan(cfg4), (1,), budget=every11 * 1.001).values()
    assert "every 11th block (2 of 12): model.ac_every=11" in line
    monkeypatch.setattr(engine.plan, "H100_USABLE", engine.plan.H100_MEMORY * engine.plan.USABLE_FRACTION)
    assert engine.run.main([str(qs), "--dry-run", "--gpus", "1", *on]) == 0
    assert "lighter checkpointing that also fits" in capsys.readouterr().out


def test_checkpointed_bytes_are_linear_in_the_checkpointed_block_count():
    """_checkpointed_parts fits a line through two checkpointed traces (the plan's and one more): at every other count
    of checkpointed blocks it gives what a trace of that every-k setting gives, from a recipe checkpointing every block
    and from one checkpointing every 3rd."""
    import pytest

    from engine.plan import _activation_model, _activation_parts, _checkpointed_parts, make_plan

    qs = ROOT / "recipes" / "quickstart.yaml"
    for every in (1, 3):
        cfg = load_config(qs, ["model.activation_checkpointing=true", f"model.ac_every={every}"])
        model, context = _activation_model(cfg)
        parts = _checkpointed_parts(cfg, make_plan(cfg), model, context)
        for k in (2, 4, 5, 11):
            if k == every:
                continue
            traced = _activation_parts(model, context, (k, cfg.model.ac_policy), compiled=cfg.model.compile)
            assert parts(len(range(0, 12, k))) == pytest.approx(traced, rel=1e-9), (every, k)


def test_run_notes_lighter_checkpointing_for_the_card(monkeypatch, tmp_path, capsys):
    """Before a GPU run with checkpointing on, engine.run notes a lighter setting that the plan fits on this card (the
    card's size faked here; training stubbed), and says nothing with checkpointing off."""
    import engine.run
    import engine.train

    monkeypatch.setattr(engine.run, "_gpu_memory", lambda cfg: (1, 24 * 2**30))
    monkeypatch.setattr(engine.train.Trainer, "fit", lambda self, stop_after=None: None)
    args = [str(ROOT / "recipes" / "quickstart.yaml"), "data.shards=synthetic", f"run.dir={tmp_path}/run",
            "log.progress=false"]
    assert engine.run.main(args + ["model.activation_checkpointing=true"]) == 0
    err = capsys.readouterr().err
    assert "note: activation checkpointing is on, but on this 24 GiB GPU the plan also fits" in err
    assert "model.activation_checkpointing=false" in err
    assert engine.run.main(args) == 0
    assert "note: activation checkpointing" not in capsys.readouterr().err


def test_memory_advice_names_checkpointing_every_block_where_that_fits():
    """With checkpointing every 2nd block and a card where that does not fit but every block does, the warning names
    model.ac_every=1 with its estimate; on a card too small for that as well, it does not."""
    import engine.plan as ep

    qs = ROOT / "recipes" / "quickstart.yaml"
    cfg = load_config(qs, ["model.activation_checkpointing=true", "model.ac_every=2"])
    plan = ep.make_plan(cfg)
    states = plan.memory_per_gpu(world=1)["states"]
    every = ep.make_plan(load_config(qs, ["model.activation_checkpointing=true"]))
    need_every, need_half = states + every.activation_bytes(32), states + plan.activation_bytes(32)
    assert need_every < need_half
    text = ep.memory_advice(cfg, 1, (need_every + need_half) / 2 / 0.92)
    assert text.startswith("micro batch 32 may not fit"), text
    assert f"model.ac_every=1 (checkpointing every block: {need_every / 2**30:.1f} GiB at micro 32)" in text, text
    assert "ac_every=1" not in ep.memory_advice(cfg, 1, need_every * 0.99 / 0.92)


def test_plan_traces_compiled_blocks_as_the_compiler_partitions_them(monkeypatch):
    """With model.compile, the activation trace runs the encoder's blocks partitioned as torch.compile does: a SwiGLU
    block (DINOv2 ViT-g's) then saves clearly less than eager (the gate is recomputed in backward), more so than a
    GELU block; if compiling fails, the eager trace stands."""
    import torch

    from engine.plan import measure_model
    from tests.engine_helpers import DINOV2_TINY

    def act(name, compiled):
        cfg = load_config(ROOT / "recipes" / "quickstart_dinov2.yaml",
                          DINOV2_TINY + [f"model.name={name}", f"model.compile={str(compiled).lower()}"])
        return measure_model(cfg)["act_bytes"]

    swiglu = act("vit_giant_patch14_reg4_dinov2", True) / act("vit_giant_patch14_reg4_dinov2", False)
    gelu = act("vit_small_patch14_reg4_dinov2", True) / act("vit_small_patch14_reg4_dinov2", False)
    assert swiglu < 0.9 and swiglu < gelu <= 1.0, (swiglu, gelu)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", broken)
    assert act("vit_giant_patch14_reg4_dinov2", True) == act("vit_giant_patch14_reg4_dinov2", False)
