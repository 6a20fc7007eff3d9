"""engine.cuda_graphs.GraphedForward (DINOv2's teacher as a CUDA graph) on CPU: the capture stands in as a fake graph
whose replay reruns the captured function on the static input, so what is tested is the wrapper's logic: eager warm-up
calls per input signature, one capture, replays that read the new input into the static one, gradients and
non-CUDA tensors left eager, a failed capture stopping the run with a clear error."""
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


def test_a_failed_capture_raises_and_names_the_option(monkeypatch):
    """A failed capture stops the run with the option to turn off: on a GPU it leaves CUDA's random generator in capture
    mode, so nothing could go on eagerly."""
    import pytest

    def broken(self, x):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedForward, "usable", staticmethod(lambda x: True))
    monkeypatch.setattr(GraphedForward, "_capture", broken)
    g = GraphedForward(lambda x: x - 1, warmup=2, name="DINOv2 teacher", option="objective.dinov2.teacher_graph")
    with torch.no_grad():
        outs = [g(torch.ones(2)) for _ in range(2)]  # the warm-up calls run
        assert all(torch.equal(o, torch.zeros(2)) for o in outs)
        with pytest.raises(RuntimeError, match=r"DINOv2 teacher: capturing a CUDA graph for input \(2,\) failed "
                                               r"\(RuntimeError: operation not permitted.*run without "
                                               r"objective.dinov2.teacher_graph"):
            g(torch.ones(2))
    assert not g.graphs


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
