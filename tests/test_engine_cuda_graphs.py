"""engine.cuda_graphs.GraphedForward (DINOv2's teacher as a CUDA graph) on CPU: the capture stands in as a fake graph
whose replay reruns the captured function on the static input, so what is tested is the wrapper's logic: eager warm-up
calls per input signature, one capture, replays that read the new input into the static one, gradients and
non-CUDA tensors left eager, a failed capture run eagerly from then on."""
import pytest
import torch

from engine.cuda_graphs import GraphedForward


class FakeGraph:
    def __init__(self, fn, static_in, static_out):
        self.fn, self.static_in, self.static_out, self.replays = fn, static_in, static_out, 0

    def replay(self):
        self.replays += 1
        self.static_out.copy_(self.fn(self.static_in))


def fake_capture(self, x):
    static_in = x.clone()
    static_out = self.fn(static_in)
    return FakeGraph(self.fn, static_in, static_out), static_in, static_out


def make(monkeypatch, fn, capture=fake_capture):
    monkeypatch.setattr(GraphedForward, "usable", staticmethod(lambda x: True))
    monkeypatch.setattr(GraphedForward, "_capture", capture)
    return GraphedForward(fn, warmup=2)


def test_warms_up_then_replays_with_the_new_input(monkeypatch):
    calls = []

    def fn(x):
        calls.append(x.shape)
        return x * 2 + 1

    g = make(monkeypatch, fn)
    with torch.no_grad():
        outs = [g(torch.full((3, 2), float(i))) for i in range(5)]
    assert [o[0, 0].item() for o in outs[:2]] == [1.0, 3.0]  # eager warm-up
    assert outs[4][0, 0].item() == 9.0  # replayed: the input copied in
    assert outs[3] is outs[4]  # the graph's own output, overwritten by each replay
    (entry,) = g.graphs.values()
    assert entry[0].replays == 3  # a capture runs nothing on a GPU: its call replays too
    assert len(calls) == 2 + 1 + 3  # warm-up, the capture, and the fake graph's replays


def test_signatures_get_their_own_graph_and_grad_stays_eager(monkeypatch):
    g = make(monkeypatch, lambda x: x + 1)
    with torch.no_grad():
        for _ in range(3):
            g(torch.zeros(2, 2))
            g(torch.zeros(4, 2))
            g(torch.zeros(4, 2, dtype=torch.float64))
    assert len(g.graphs) == 3
    x = torch.zeros(2, 2, requires_grad=True)
    out = g(x)  # grad enabled: eager, so autograd sees the ops
    assert out.requires_grad and out.grad_fn is not None


def test_a_failed_capture_runs_eagerly_and_is_not_retried(monkeypatch, capsys):
    tries = []

    def broken(self, x):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    g = make(monkeypatch, lambda x: x - 1, capture=broken)
    with torch.no_grad():
        outs = [g(torch.ones(2)) for _ in range(5)]
    assert all(torch.equal(o, torch.zeros(2)) for o in outs)
    assert tries == [1] and not g.graphs
    assert "no CUDA graph" in capsys.readouterr().err


def test_cpu_tensors_run_eagerly():
    g = GraphedForward(lambda x: x * 3)
    with torch.no_grad():
        for _ in range(4):
            assert torch.equal(g(torch.ones(2)), torch.full((2,), 3.0))
    assert not g.graphs and not g.calls


def test_dinov2_teacher_forward_through_the_graph(monkeypatch):
    """objective.dinov2.teacher_graph: the teacher's pass goes through GraphedForward (faked here) with the output of
    the plain pass; off, or with a gradient, it is the plain pass."""
    from pathlib import Path

    from engine.config import load_config
    from engine.objectives import build_objective
    from tests.engine_helpers import DINOV2_TINY

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "quickstart_dinov2.yaml"
    monkeypatch.setattr(GraphedForward, "usable", staticmethod(lambda x: True))
    monkeypatch.setattr(GraphedForward, "_capture", fake_capture)
    cfg = load_config(recipe, DINOV2_TINY + ["objective.dinov2.teacher_graph=true"])
    torch.manual_seed(0)
    model = build_objective(cfg, torch.device("cpu"))
    assert model.teacher_graph is True
    glob = model.synthetic_batch(2, "cpu")[0]
    with torch.no_grad():
        want = model.forward_dense(model.teacher["encoder"], glob)
        got = [model.teacher_forward(glob).clone() for _ in range(4)]
    assert all(torch.allclose(o, want, atol=1e-6) for o in got)
    (entry,) = model._teacher_graphed.graphs.values()
    assert entry[0].replays == 2
    model.teacher_graph = False
    with torch.no_grad():
        model.teacher_forward(glob)
    assert entry[0].replays == 2
    assert load_config(recipe, []).objective.dinov2.teacher_graph is False


# ----------------------------------------------------------------------------- GraphedTraining
def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def test_graphed_training_warms_up_captures_once_and_accumulates(monkeypatch):
    """GraphedTraining's logic on CPU (the capture faked: a fresh module from make(), run eagerly): eager warm-up calls
    per signature, one capture, replays after it; gradients accumulated over micro-batches are copied out before a
    replay (on a GPU they may be the backward graph's own buffer) and end up as the eager sums."""
    from engine.cuda_graphs import GraphedTraining

    mlp, made, captures = _mlp(), [], []

    def make():
        made.append(1)
        return torch.nn.Sequential(*mlp)  # the same layers: shared parameters

    def fake_capture(self, args):
        captures.append([tuple(a.shape) for a in args])
        return self.make()

    monkeypatch.setattr(GraphedTraining, "usable", staticmethod(lambda args: True))
    monkeypatch.setattr(GraphedTraining, "_capture", fake_capture)
    g = GraphedTraining(make, warmup=2)
    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for x in xs:  # two warm-up calls, then micro-batches of one step: eager until a step's first call, then replays
        g(x.clone().requires_grad_()).square().sum().backward()
    assert len(made) == 1 and not g.graphs  # every call after the first had a gradient accumulated: no capture
    mlp.zero_grad(set_to_none=True)
    g(xs[0].clone().requires_grad_()).square().sum().backward()  # a new step: captured, then replayed
    g(xs[1].clone().requires_grad_()).square().sum().backward()
    assert len(made) == 2 and captures == [[(5, 4)]] and len(g.graphs) == 1
    xs = xs[:2]
    got = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad(set_to_none=True)
    for x in xs:
        mlp(x).square().sum().backward()
    for a, b in zip(got, (p.grad for p in mlp.parameters())):
        torch.testing.assert_close(a, b)
    g(torch.randn(2, 4))  # another signature: warm-up again
    assert g.calls[g.key((torch.randn(2, 4),))] == 1
    with torch.no_grad():  # no gradient: the module itself
        assert torch.equal(g(xs[0]), mlp(xs[0]))


def test_graphed_training_failed_capture_and_cpu(monkeypatch):
    from engine.cuda_graphs import GraphedTraining

    mlp = _mlp()
    g = GraphedTraining(lambda: mlp)
    for _ in range(4):  # CPU tensors: eager, no signature counted
        g(torch.ones(2, 4))
    assert not g.calls and not g.graphs

    def broken(self, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedTraining, "usable", staticmethod(lambda args: True))
    monkeypatch.setattr(GraphedTraining, "_capture", broken)
    g = GraphedTraining(lambda: mlp, warmup=1, name="test stack")
    assert torch.equal(g(torch.ones(2, 4, requires_grad=True)), mlp(torch.ones(2, 4)))  # warm-up
    mlp(torch.ones(2, 4)).sum().backward()  # a gradient accumulated: not a step's first call, no capture yet
    g(torch.ones(2, 4, requires_grad=True))
    mlp.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="test stack: capturing the CUDA graphs .* operation not permitted"):
        g(torch.ones(2, 4, requires_grad=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bench/gpu_session.sh K77 runs it")
def test_graphed_training_on_gpu_matches_eager_with_accumulation():
    """A real capture (forward and backward graphs) under bf16 autocast: steps of two micro-batches each,
    the optimizer updating the shared parameters in place between them; gradients and outputs as the eager module's."""
    from engine.cuda_graphs import GraphedTraining

    def steps(graphed: bool):
        mlp = _mlp().cuda()
        call = GraphedTraining(lambda: torch.nn.Sequential(*mlp), warmup=1) if graphed else mlp
        opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
        outs = []
        for step in range(4):
            opt.zero_grad(set_to_none=True)
            for micro in range(2):
                x = torch.randn(16, 4, device="cuda", generator=torch.Generator("cuda").manual_seed(10 * step + micro))
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = call(x.requires_grad_())
                    out.float().square().mean().backward()
                outs.append(out.detach().float().clone())
                del out  # as a training loop would: no autograd graph of this micro-batch alive at the next one's
            grads = [p.grad.clone() for p in mlp.parameters()]
            opt.step()
        return outs, grads, (call.graphs if graphed else None)

    outs, grads, graphs = steps(True)
    assert len(graphs) == 1  # captured: steps 2-4 replayed
    want_outs, want_grads, _ = steps(False)
    for a, b in zip(outs + grads, want_outs + want_grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bench/gpu_session.sh K77 runs it")
def test_dinov2_student_graph_on_gpu_matches_eager():
    """The tiny DINOv2 on a GPU with our kernels: the student's blocks captured (forward and backward, drop path on),
    two micro-batches a step; losses and gradients as without the graph."""
    from pathlib import Path

    from engine.config import load_config
    from engine.objectives import build_objective
    from tests.engine_helpers import DINOV2_TINY

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "quickstart_dinov2.yaml"

    def run(graph: bool):
        torch.manual_seed(0)
        cfg = load_config(recipe, DINOV2_TINY + ["model.kernels=triton", "model.drop_path=0.2",
                                                 f"objective.dinov2.student_graph={str(graph).lower()}"])
        model = build_objective(cfg, torch.device("cuda")).cuda().train()
        glob, loc = model.synthetic_batch(4, "cuda")
        losses = []
        for step in range(4):
            model.zero_grad(set_to_none=True)
            for micro in range(2):
                torch.manual_seed(10 * step + micro)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model([glob, loc])
                (out["loss"].float() / 2).backward()
                losses.append(out["loss"].detach().float())
                del out
        return model, torch.stack(losses), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                            if p.grad is not None}

    model, losses, grads = run(True)
    (graphed,) = model._student_graphs.values()
    assert len(graphed.graphs) == 1
    _, want_losses, want = run(False)
    torch.testing.assert_close(losses, want_losses, rtol=1e-2, atol=1e-3)
    for n in want:
        scale = want[n].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(grads[n] / scale, want[n] / scale, rtol=5e-2, atol=2e-2, msg=n)
