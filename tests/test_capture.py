"""elit_kernels.models.capture: the per-signature cache and the eager fallback (on any machine); capture and
replay themselves need CUDA (tests/test_gpu_model.py runs them on a GPU)."""
from __future__ import annotations

import contextlib
import gc
import warnings
import weakref

import numpy as np
import pytest
import torch

from elit_kernels.flow import euler_sample
from elit_kernels.models import ElitDiT, GraphedForward, capture, elit_config


def _model():
    torch.manual_seed(0)
    m = ElitDiT(elit_config("tiny", 64), backend="torch")
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    return m.eval()


def _inputs(b=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, 8, 8, generator=g), torch.rand(b, generator=g), torch.tensor([1, 2, 3][:b])


def test_fallback_warns_once_and_matches_eager():
    m = _model()
    x, t, y = _inputs()
    gf = capture(m)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = gf(x, t, y, [4, 1, 2])
        b = gf(x, t, y, [4, 1, 2])
    msgs = [str(x.message) for x in w if "CUDA-graph capture is off" in str(x.message)]
    assert len(msgs) == 1 and ("no CUDA device" in msgs[0] or "not CUDA tensors" in msgs[0]), msgs
    with torch.no_grad():
        want = m(x, t, y, [4, 1, 2])
    assert torch.equal(a, want) and torch.equal(b, want)
    assert gf.stats == {"captures": 0, "replays": 0, "eager": 2, "invalidated": 0}


class _FakeGraph:
    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()


class _Recorded(GraphedForward):
    """Capture replaced by a recorded eager call, so the signature cache runs on a CPU."""

    def _why_not(self, x):
        return None

    def _capture(self, x, t, y, key):
        xs, ts, ys = x.clone(), t.clone(), y.clone()
        out = torch.empty_like(x)
        lay = self.model.layout(list(key[-1]), x.shape[0], x.device)

        def run():
            with torch.no_grad():
                out.copy_(self.model(xs, ts, ys, layout=lay))
        self.stats["captures"] += 1
        return _FakeGraph(run), (xs, ts, ys), out


def test_a_graph_is_not_replayed_under_other_settings_than_it_was_captured_with(monkeypatch):
    """A graph bakes in what was in force at capture: CUDA autocast (a forward captured under bf16 autocast would
    stay bf16 outside it), the fp32 matmul precision, the model's backend, $ELIT_BACKEND, deterministic algorithms.
    Each such setting is part of the signature, so a change captures again instead of replaying silently; changing
    it back replays the first graph."""
    from elit_kernels import _precision

    m = _model()
    x, t, y = _inputs()
    gf = _Recorded(m, max_graphs=16)
    bud = [4, 1, 2]

    def call():
        out = gf(x, t, y, bud)
        with torch.no_grad():
            assert torch.equal(out, m(x, t, y, bud))
        return gf.stats["captures"]

    assert call() == 1 and call() == 1
    m.backend = "reference"
    assert call() == 2
    m.backend = "torch"
    assert call() == 2  # the first graph again
    monkeypatch.setenv("ELIT_BACKEND", "reference")
    assert call() == 3
    monkeypatch.delenv("ELIT_BACKEND")
    # as under torch.autocast("cuda"); CPU autocast stays off (the attention ops switch autocast off around their
    # call, whose exit restores the state this reads: True for the CPU would turn real CPU autocast on)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda *a: torch.bfloat16)
    k_amp = gf.signature(x, t, y, bud)
    assert call() == 4
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda *a: torch.float16)
    assert gf.signature(x, t, y, bud) != k_amp
    monkeypatch.undo()
    monkeypatch.setattr(_precision, "fp32_matmul_precision", lambda: "tf32")
    assert call() == 5
    monkeypatch.undo()
    assert call() == 5 and gf.signatures[-1][-1] == tuple(bud)  # budgets stay the signature's last field


def test_signature_cache_replays_copies_inputs_and_keeps_the_most_recent():
    m = _model()
    x, t, y = _inputs()
    gf = _Recorded(m, max_graphs=2)
    sigs = ([4, 1, 2], [4, 4, 4], [1, 1, 1])
    for bud in sigs:
        out = gf(x, t, y, bud)
        with torch.no_grad():
            assert torch.equal(out, m(x, t, y, bud))
    assert gf.stats["captures"] == 3 and len(gf.signatures) == 2  # the oldest was dropped
    assert [s[-1] for s in gf.signatures] == [(4, 4, 4), (1, 1, 1)]
    x2 = torch.randn_like(x)  # new inputs, same signature: replayed on the copied-in values
    out = gf(x2, t, y, [1, 1, 1])
    with torch.no_grad():
        assert torch.equal(out, m(x2, t, y, [1, 1, 1]))
    assert gf.stats["captures"] == 3 and gf.stats["replays"] == 4
    assert out.data_ptr() != gf._graphs[gf.signatures[-1]][2].data_ptr()  # a copy, not the static buffer
    assert gf.signature(x, t, y, None)[-1] == (4, 4, 4)  # None: J_max for every sample
    gf.clear()
    assert gf.signatures == []


class _CpuCapture(GraphedForward):
    """The real ``_capture`` on a CPU: CUDA's stream and graph primitives replaced by no-ops (``cuda_faked``)."""

    def _why_not(self, x):
        return None


@pytest.fixture
def cuda_faked(monkeypatch):
    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g, pool=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)


def test_a_captured_graph_keeps_its_layout_alive(cuda_faked):
    """A graph's kernels read its layout's device tensors (cu_seqlens, index maps, attention plans) at their
    addresses at capture; the model's layout cache drops a layout after LAYOUT_CACHE_SIZE other signatures.
    Freed while the graph lives, that memory would be reused by other tensors and every replay would read it:
    a wrong answer, silently. The graph's entry must hold its layout, and only as long as the graph."""
    m = _model()
    x, t, y = _inputs()
    made = []
    real_layout = m.layout

    def recording_layout(budgets, batch, device):
        lay = real_layout(budgets, batch, device)
        made.append(weakref.ref(lay))
        return lay
    m.layout = recording_layout
    gf = _CpuCapture(m, warmup=1)
    gf(x, t, y, [4, 1, 2])
    assert gf.stats["captures"] == 1 and made
    del m.layout  # later layouts are the model's own
    for j in range(m.LAYOUT_CACHE_SIZE + 1):  # other signatures push the captured one out of the model's cache
        m.layout([j % 5, (j // 5) % 5, 3], 3, "cpu")
    gc.collect()
    assert all(r() is not None for r in made), "a captured graph's layout was freed while the graph lives"
    assert gf._graphs[gf.signatures[0]][3] is made[0]()
    gf.clear()
    gc.collect()
    assert all(r() is None for r in made)  # held by the graph alone: dropped with it


def test_a_model_whose_tensors_were_replaced_is_captured_again(cuda_faked):
    """A graph reads the model's parameters at their addresses at capture. ``.half().float()``, ``.to()`` or a new
    ``nn.Parameter`` replaces them: replayed, the old graph would read freed (or stale) memory, a wrong answer
    silently (a hostile-user round read this in the code). Such a change drops the graphs; an in-place write
    keeps them (the graph reads the new values at the same addresses). The faked replay returns what the capture
    computed, so a stale graph shows as the old weights' output."""
    m = _model()
    x, t, y = _inputs()
    bud = [4, 1, 2]
    gf = _CpuCapture(m, warmup=1)

    def eager():
        with torch.no_grad():
            return m(x, t, y, bud)
    assert torch.equal(gf(x, t, y, bud), eager()) and gf.stats["captures"] == 1
    with torch.no_grad():  # in place: same addresses, the graphs stay
        for p in m.parameters():
            p.mul_(1.0)
    gf(x, t, y, bud)
    assert gf.stats["captures"] == 1 and gf.stats["invalidated"] == 0
    keep = [p.data for p in m.parameters()]  # the old storage stays allocated: new storage gets new addresses
    m.double().float()
    with torch.no_grad():
        next(m.parameters()).mul_(1.5)  # and the weights differ, so a stale graph's output would too
    assert torch.equal(gf(x, t, y, bud), eager())
    assert gf.stats["captures"] == 2 and gf.stats["invalidated"] == 1
    lin = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    lin.weight = torch.nn.Parameter(lin.weight.detach() * 2)  # a new Parameter: a registration
    assert torch.equal(gf(x, t, y, bud), eager()) and gf.stats["captures"] == 3
    m.train()  # the mode is part of what a graph captured
    gf(x, t, y, bud)
    m.eval()
    gf(x, t, y, bud)
    assert gf.stats["captures"] == 5 and gf.stats["invalidated"] == 4
    gf(x, t, y, bud)  # nothing changed: a replay
    assert gf.stats["captures"] == 5 and gf.stats["replays"] == 7
    del keep


def test_arguments_are_checked():
    m = _model()
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="max_graphs: expected a positive int"):
            GraphedForward(m, max_graphs=bad)
    with pytest.raises(ValueError, match="warmup: expected an int >= 1"):
        GraphedForward(m, warmup=0)
    with pytest.raises(TypeError, match=r"^model: already a GraphedForward"):
        capture(capture(m))
    with pytest.raises(TypeError, match=r"^model: expected an ElitDiT \(a module with cfg, layout and forward\)"):
        GraphedForward(type("NoLayout", (), {"cfg": m.cfg, "__call__": lambda self, *a: None})())
    gf = GraphedForward(m, max_graphs=np.int64(2), warmup=np.int32(1))  # NumPy ints are ints
    assert (type(gf.max_graphs), gf.max_graphs, type(gf.warmup), gf.warmup) == (int, 2, int, 1)
    with pytest.raises(ValueError, match="max_graphs: expected a positive int"):
        GraphedForward(m, max_graphs=np.True_)
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="budgets"):
        _Recorded(m)(x, t, y, [4, 1])  # one budget short


def test_inputs_that_require_grad_are_refused_not_silently_detached():
    """A graphed forward is inference only: x or t requiring grad (grad mode on) is named, where the output used
    to come back without a graph and backward() failed far away; under no_grad the same inputs run."""
    m = _model()
    g = capture(m)
    x, t, y = _inputs()
    for name, xx, tt in (("x", x.clone().requires_grad_(), t), ("t", x, t.clone().requires_grad_())):
        with pytest.raises(ValueError, match=f"^{name}: requires grad, but a graphed forward is inference only"):
            g(xx, tt, y, [4, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the CPU fallback's one-line warning
        with torch.no_grad():
            got = g(x.clone().requires_grad_(), t, y, [4, 1, 2])
            want = m(x, t, y, [4, 1, 2])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sampler_graphed_equals_eager_on_cpu():
    m = _model()
    x, _, y = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = euler_sample(m, x, y, steps=3, budget=[4, 1, 2], mode="ccfg", scale=1.5, graphed=True)
    b = euler_sample(m, x, y, steps=3, budget=[4, 1, 2], mode="ccfg", scale=1.5)
    assert torch.equal(a, b)
    gf = _Recorded(m)
    c = euler_sample(gf, x, y, steps=3, budget=[4, 1, 2], mode="ccfg", scale=1.5, graphed=True)
    torch.testing.assert_close(c, b, rtol=0, atol=0)
    assert gf.stats["captures"] == 1 and gf.stats["replays"] == 3  # one signature (CCFG's 2B batch), every step


def test_bench_graphed_backend_names(capsys):
    from elit_kernels.bench.cli import main
    from elit_kernels.bench.scenarios import split_backend

    assert split_backend("default+graph") == (None, "graph")
    assert split_backend("default") == (None, "")
    assert split_backend("torch+graph") == ("torch", "graph") and split_backend("torch") == ("torch", "")
    assert split_backend("torch+compile") == ("torch", "compile")
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--config", "tiny", "--resolution", "64", "--backends", "torch+graph"])
    assert e.value.code == 2
    assert "--backends: 'torch+graph' replays CUDA graphs, which needs --device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--config", "tiny", "--resolution", "64", "--backends", "torch+jit"])
    assert "unknown suffix '+jit'; expected NAME, NAME+graph or NAME+compile" in capsys.readouterr().err


def test_bench_times_a_compiled_model_on_cpu(tmp_path):
    # eager vs compiled in one interleaved run (inductor on the CPU: one compile per budget signature)
    import json

    from elit_kernels.bench.cli import main

    rc = main(["--device", "cpu", "--config", "tiny", "--resolution", "64", "--backends", "torch,torch+compile",
               "--budgets", "4", "--scenarios", "uniform", "--presets", "paper", "--repeats", "2", "--warmup", "1",
               "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    got = {r["backend"]: r for r in rows if r["model"] == "elit" and r["scenario"] == "uniform"}
    assert set(got) == {"torch", "torch+compile"}
    assert got["torch+compile"]["latency_ms"] > 0 and got["torch"]["latency_ms"] > 0
    assert got["torch+compile"]["gflops"] == got["torch"]["gflops"]  # FLOPs counted on the eager twin


def test_bench_compiles_every_signature_past_dynamos_default_limit(monkeypatch):
    # More budget signatures than dynamo's default recompile_limit (8): past it dynamo runs the forward eagerly, so
    # a +compile row would time eager forwards. elit-bench raises the limit for its run and restores it after.
    from torch._dynamo.testing import CompileCounter

    from elit_kernels.bench.cli import main

    cnt, real = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, **{**kw, "backend": cnt}))
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    rc = main(["--device", "cpu", "--config", "tiny", "--resolution", "64", "--backends", "torch+compile",
               "--budgets", "1,2,3,4", "--scenarios", "uniform,mixed,guidance", "--presets", "paper", "--repeats", "1",
               "--warmup", "1", "--no-progress"])
    assert rc == 0
    assert cnt.frame_count > 8, f"{cnt.frame_count} graphs: dynamo stopped compiling at its limit"
    assert torch._dynamo.config.recompile_limit == limit


def test_compiled_sampling_run_compiles_once_per_budget_signature():
    # A sampling run keeps one budget signature, so a compiled model traces once for all its steps; leaving the
    # guidance interval adds the unguided signature (one more graph), and nothing else recompiles.
    from torch._dynamo.testing import CompileCounter

    m = _model()
    x, _, y = _inputs()
    torch._dynamo.reset()
    cnt = CompileCounter()
    compiled = torch.compile(m, backend=cnt, fullgraph=True)
    with torch.no_grad():
        got = euler_sample(compiled, x, y, steps=6, budget=[4, 1, 2], mode="ccfg", scale=1.5, weak_budget=1)
    assert cnt.frame_count == 1, f"{cnt.frame_count} graphs for one signature"
    want = euler_sample(m, x, y, steps=6, budget=[4, 1, 2], mode="ccfg", scale=1.5, weak_budget=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    euler_sample(compiled, x, y, steps=6, budget=[4, 1, 2], mode="ccfg", scale=1.5, weak_budget=1,
                 guidance_interval=(0.0, 0.5))
    assert cnt.frame_count == 2, f"{cnt.frame_count} graphs for two signatures (guided, unguided)"


@pytest.mark.parametrize("preset", ["paper", "released"])
def test_inductor_compiled_model_equals_eager(preset):
    # inductor on the CPU (its fusions of LayerNorm + modulate, GELU, residuals): the whole forward, one graph,
    # a mixed budget batch with an empty sample, within fp32 rounding of eager
    from elit_kernels.models.config import preset_config

    cfg = preset_config(preset, "tiny", 64)
    torch.manual_seed(0)
    m = ElitDiT(cfg).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size)
    t, y = torch.rand(3), torch.tensor([1, 2, cfg.num_classes])
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x, t, y, [4, 0, 2]), m(x, t, y, [4, 0, 2])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(want, m(x, t, y, [4, 4, 4]))  # the budgets matter, so the check can fail


@pytest.mark.parametrize("bad,match", [("t1", r"t: expected a tensor of shape \[3\]"), ("t0", r"t: expected a tensor"),
                                       ("y0", r"y: expected class ids of shape \[3\]"),
                                       ("yclass", r"y: class ids must be in \[0, 10\]")])
def test_a_replay_checks_t_and_y_as_the_eager_forward_does(bad, match):
    """After a signature's first call, a replay copies t and y into the captured buffers: ``copy_`` would spread
    a t of shape [1] (or []) over every sample, silently, where the eager model raises naming t (a hostile-user
    round read this in the code). Every call checks its inputs first; nothing is captured or warned for them."""
    m = _model()
    x, t, y = _inputs()
    gf = _Recorded(m)
    gf(x, t, y, [4, 1, 2])
    args = {"t1": (t[:1], y), "t0": (t[0], y), "y0": (t, y[0]), "yclass": (t, y + 100)}[bad]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=match):
            gf(x, *args, [4, 1, 2])
        with pytest.raises(ValueError, match=match):
            m(x, *args, [4, 1, 2])  # the same error as the eager forward's
    assert gf.stats["captures"] == 1 and gf.stats["eager"] == 0
