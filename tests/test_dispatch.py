"""Default dispatch (elit_kernels/attention/dispatch.py): shape classes, the committed table, the static order,
tuning and its cache, overrides; the model forward reads nothing from the device; the package's import graph."""
from __future__ import annotations

import ast
import json
import os
import pathlib

import pytest
import torch

import elit_kernels
from elit_kernels import attention as A
from elit_kernels.attention import SegmentRuns, dispatch as D, registry as R
from elit_kernels.testing import random_varlen_inputs

from cases import counting_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _sm90_without_a_gpu(monkeypatch):
    """Inputs made to look as if they were on a GPU (``_cuda_like``, ``_on_gpu``) make dispatch read the
    architecture of a device this machine may not have: it is sm_90 (an H100 or H200) unless a GPU is here."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(R, "_compute_capability", lambda device: (9, 0))
        monkeypatch.setattr(D, "_GPU_ARCHS", {})


@pytest.fixture
def fakes():
    made = []

    def make(name, priority=-500):
        b = R.register_backend(counting_reference(name, priority))
        made.append(name)
        return b

    D.clear_decisions()
    yield make
    for n in made:
        R._REGISTRY.pop(n, None)
    D.clear_decisions()


def _inp(lens_q=(4, 4, 4), lens_k=(4, 4, 4), segments=True, device="cpu", dtype=torch.float32, grad=False):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(list(lens_q), list(lens_k), 2, 16, seed=3, dtype=dtype,
                                                   requires_grad=grad)
    seg = SegmentRuns.from_lengths(lens_q, lens_k) if segments else None
    # segments=False: the lengths known only on the device (value checks off, tracing, capture, a plan)
    return A.validate_inputs(q, k, v, cq, ck, mq, mk, None, False, segments=seg, derive_segments=segments)


def test_shape_class_kinds_and_buckets():
    c = D.shape_class(_inp())
    assert (c["kind"], c["lq"], c["lk"], c["segments"], c["gpu"], c["dtype"], c["grad"]) == \
        ("uniform", 4, 4, 4, "cpu", "float32", False)
    c = D.shape_class(_inp((3, 3, 5), (9, 9, 17)))
    assert (c["kind"], c["lq"], c["lk"]) == ("runs", 8, 32)  # real longest segments, bucketed up
    many = tuple(range(1, D.FEW_RUNS + 3))
    assert D.shape_class(_inp(many, many))["kind"] == "ragged"
    nos = D.shape_class(_inp(segments=False))
    assert nos["kind"] == "ragged" and nos["lq"] == 4  # lengths known only on the device: max_seqlen's bucket
    assert D.shape_class(_inp(grad=True))["grad"] is True
    assert [D._bucket(n) for n in (0, 1, 2, 3, 64, 65)] == [0, 1, 2, 4, 64, 128]


def test_static_order_on_cpu_follows_priority_and_default_dispatch_uses_it(fakes):
    inp = _inp()
    assert D.static_order(inp) == [b.name for b in R.registered_backends()]
    top = fakes("_top", priority=10_000)
    out = A.varlen_attention(inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, 4, 4,
                             segments=inp.segments)
    assert top.calls == 1 and out.shape == inp.q.shape
    # a second call with the same shape class is a cached decision, still the same backend
    A.varlen_attention(inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, 4, 4, segments=inp.segments)
    assert top.calls == 2


def test_cached_decision_follows_the_registry(fakes):
    inp = _inp()
    top = fakes("_top", priority=10_000)
    assert A.select_backend(inp) is top
    R._REGISTRY.pop("_top")  # removed behind the registry's back: the cached decision must not outlive it
    assert A.select_backend(inp).name != "_top"
    newer = fakes("_newer", priority=20_000)  # a registration invalidates every cached decision
    assert A.select_backend(inp) is newer


def test_backend_not_default_eligible_is_never_picked_but_runs_by_name(fakes):
    b = fakes("_byname", priority=50_000)
    b.default_eligible = False
    inp = _inp()
    assert A.select_backend(inp).name != "_byname"
    assert A.select_backend(inp, "_byname") is b
    ok, tried = D.candidates(inp)
    assert "_byname" not in [c.name for c in ok]
    assert any(t.startswith("_byname: not picked by default dispatch") for t in tried)


def test_override_wins_over_table_and_tuning(fakes, monkeypatch):
    inp = _inp()
    fakes("_fast", priority=-1)
    D._TUNED[D._class_key(D.shape_class(inp))] = ["_fast"]
    assert A.select_backend(inp).name == "_fast"
    assert A.select_backend(inp, "reference").name == "reference"
    monkeypatch.setenv("ELIT_BACKEND", "torch")
    assert A.select_backend(inp).name == "torch"


def _cuda_like(inp, monkeypatch, gpu="NVIDIA H200", arch="sm_90"):
    """Pretend ``inp`` is on a GPU for the ranking functions (they read only the device type, name and
    architecture; a GPU this machine may have does not answer for the pretended one)."""
    monkeypatch.setattr(D, "gpu_name", lambda device: gpu)
    monkeypatch.setattr(D, "gpu_arch", lambda device: arch)

    class _Dev:
        type = "cuda"

    class _Q:
        device = _Dev()
        dtype = inp.q.dtype
        shape = inp.q.shape
        requires_grad = False

    class _Inp:
        pass

    fake = _Inp()
    for f in ("k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "segments", "return_lse",
              "softcap", "head_dim", "num_segments", "requires_grad", "causal", "has_window"):
        setattr(fake, f, getattr(inp, f))
    fake.q = _Q()
    return fake


def test_table_entry_gives_its_ranking_and_unknown_gpu_falls_back_to_static(monkeypatch):
    inp = _inp(dtype=torch.bfloat16)
    table = {"entries": [
        {"gpu": "NVIDIA H200", "dtype": "bfloat16", "kind": "uniform", "grad": False, "head_dim": 16, "lq": 4,
         "lk": 4, "segments": 4, "ranking": ["triton", "torch"]},
        {"gpu": "NVIDIA H200", "dtype": "bfloat16", "kind": "uniform", "grad": False, "head_dim": 16, "lq": 1024,
         "lk": 1024, "segments": 4, "ranking": ["torch_varlen", "torch"]},
    ]}
    monkeypatch.setattr(D, "_TABLE", table)
    fake = _cuda_like(inp, monkeypatch)
    order, src = D.ranking(fake)
    assert src == "table" and order[:2] == ["triton", "torch"]  # the nearest entry, not the 1024 one
    assert set(order) == set(R.known_backends())  # every backend still ranked after the table's
    fake = _cuda_like(inp, monkeypatch, gpu="Some Other GPU")
    order, src = D.ranking(fake)
    assert src == "static" and order[0] == "torch"  # uniform segments known on the host: dense SDPA, PyTorch's pick
    assert D.table_ranking({"gpu": "NVIDIA H200", "dtype": "float16", "kind": "uniform", "grad": False,
                            "head_dim": 16, "lq": 4, "lk": 4, "segments": 4}, table) is None


def test_a_gpu_without_entries_reads_its_architecture_siblings_before_the_static_order(monkeypatch):
    """An H100 reads an H200's measured rankings (same sm_90 SMs and kernels) rather than the static order; its own
    entries win where it has them; a GPU of another architecture, or one whose architecture is not known (while
    tracing), gets the static order; sibling entries equally near rank together."""
    inp = _inp(dtype=torch.bfloat16)
    h200 = {"gpu": "NVIDIA H200", "arch": "sm_90", "dtype": "bfloat16", "kind": "uniform", "grad": False,
            "head_dim": 16, "lq": 4, "lk": 4, "segments": 4, "ranking": ["triton", "torch"], "ms": {"triton": 1.0,
                                                                                               "torch": 3.0}}
    table = {"entries": [h200]}
    monkeypatch.setattr(D, "_TABLE", table)
    fake = _cuda_like(inp, monkeypatch, gpu="NVIDIA H100 80GB HBM3")
    order, src = D.ranking(fake)
    assert (src, order[:2]) == ("table-arch", ["triton", "torch"]), (src, order)
    assert D.table_match(D.shape_class(fake), table) == (["triton", "torch"], "arch")
    own = {**h200, "gpu": "NVIDIA H100 80GB HBM3", "lq": 1024, "lk": 1024, "ranking": ["torch_varlen", "torch"],
           "ms": {"torch_varlen": 1.0, "torch": 2.0}}
    table["entries"].append(own)
    assert D.ranking(fake)[0][:2] == ["torch_varlen", "torch"] and D.ranking(fake)[1] == "table"  # its own, though farther
    gh200 = {**own, "gpu": "NVIDIA GH200 480GB", "lq": 4, "lk": 4, "ranking": ["torch", "torch_varlen", "triton"],
             "ms": {"torch": 1.0, "torch_varlen": 1.5, "triton": 9.0}}
    table["entries"] = [h200, gh200]
    gh = D.shape_class(fake)
    # both siblings at distance 0, times relative to each one's fastest summed: torch 3 + 1, torch_varlen 3 (the
    # H200 did not time it: its slowest) + 1.5, triton 1 + 9
    assert D.table_match(gh, table)[0][0] == "torch" and D.table_match(gh, table)[1] == "arch"
    monkeypatch.setattr(D, "gpu_arch", lambda device: "sm_80")
    assert D.ranking(fake)[1] == "static"  # an A100 is not an H200
    monkeypatch.setattr(D, "gpu_arch", lambda device: "unknown")
    assert D.ranking(fake)[1] == "static"
    assert D._valid_entry(h200) and not D._valid_entry({**h200, "arch": 90})
    assert D._valid_entry({**h200, "arch": None})  # as if absent: read by its own GPU only
    assert not any(D._valid_entry({**h200, "arch": bad}) for bad in (0, False, [], {}))
    no_arch = {k: x for k, x in h200.items() if k != "arch"}
    monkeypatch.setattr(D, "gpu_arch", lambda device: "sm_90")
    assert D.table_match(D.shape_class(fake), {"entries": [no_arch]}) == (None, None)


def test_gpu_arch_is_read_once_per_cuda_device_and_cpu_is_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(R, "_compute_capability", lambda device: calls.append(str(device)) or (9, 0))
    monkeypatch.setattr(D, "_GPU_ARCHS", {})
    assert D.gpu_arch(torch.device("cpu")) == "cpu" and calls == []
    assert D.gpu_arch(torch.device("cuda", 1)) == "sm_90" == D.gpu_arch(torch.device("cuda", 1))
    assert calls == ["cuda:1"]  # cached
    monkeypatch.setattr(R, "_compute_capability", lambda device: (10, 0))
    assert D.gpu_arch(torch.device("cuda", 0)) == "sm_100" and D.gpu_arch(torch.device("cuda", 1)) == "sm_90"


def test_static_order_on_gpu_by_shape_class(monkeypatch):
    ragged = _cuda_like(_inp(segments=False, dtype=torch.bfloat16), monkeypatch)
    assert D.static_order(ragged)[:2] == ["torch_varlen", "triton"]
    fp32 = _cuda_like(_inp(segments=False, dtype=torch.float32), monkeypatch)
    assert D.static_order(fp32)[0] == "torch"  # SDPA (TF32 when allowed) beats the fp32 Triton kernels
    assert D.static_order(_cuda_like(_inp(dtype=torch.bfloat16), monkeypatch))[0] == "torch"
    mixed = _cuda_like(_inp((256, 64), (256, 64), dtype=torch.bfloat16), monkeypatch)
    assert D.static_order(mixed)[:2] == ["torch", "sdpa_cudnn"]
    for order in (D.static_order(ragged), D.static_order(fp32)):
        assert order.index("cuda") > order.index("triton")


def test_unmeasured_window_backend_ranks_after_every_measured_path(monkeypatch):
    # triton_window has no GPU timing yet: on CUDA the static order, and the table's rankings followed by the
    # static order, put it after the library, PyTorch and triton paths for Read/Write shapes, with or without
    # host-side segments; tuning still times it (it is a candidate wherever it can run).
    for segments in (False, True):
        for dtype in (torch.bfloat16, torch.float32):
            inp = _cuda_like(_inp([4] * 8, [64] * 8, segments=segments, dtype=dtype), monkeypatch)
            for order in (D.static_order(inp), D.ranking(inp)[0]):
                measured = [n for n in order if n not in ("triton_window", *D.NEVER_TIMED, "flash_attn")]
                assert order.index("triton_window") > max(order.index(n) for n in measured), order
    with open(D._TABLE_PATH) as f:
        assert not any("triton_window" in e["ranking"] for e in json.load(f)["entries"])
    if R.reasons(R.get_backend("triton_window"), _inp()):
        pytest.skip("triton_window cannot run here: " + "; ".join(R.reasons(R.get_backend("triton_window"), _inp())))
    read, core = _inp([4] * 8, [64] * 8, segments=False), _inp([200], [200], segments=False)
    assert "triton_window" in [b.name for b in D.candidates(read)[0]]
    ok, tried = D.candidates(core)
    assert "triton_window" not in [b.name for b in ok]
    assert any(t.startswith("triton_window: max_seqlen_k is 200: key segments of at most 128 keys") for t in tried)


def test_committed_table_names_its_device_and_known_backends():
    with open(D._TABLE_PATH) as f:
        table = json.load(f)
    for field in ("device", "torch", "date"):
        assert table.get(field), f"dispatch_table.json: {field} missing"
    for e in table["entries"]:
        assert set(e["ranking"]) <= set(R.known_backends()), e
        assert e["kind"] in ("uniform", "runs", "ragged") and e["dtype"] in ("float16", "bfloat16", "float32")


def test_tuning_times_candidates_ranks_them_and_caches_on_disk(fakes, tmp_path, monkeypatch):
    monkeypatch.setenv("ELIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(D, "_DISK", None)
    slow = fakes("_slow", priority=-2)
    fakes("_fast", priority=-3)
    import time as _t

    def slow_forward(inp):
        _t.sleep(0.004)
        return R.get_backend("reference").forward(inp)

    slow.forward = slow_forward
    inp = _inp()
    res = D.tune_inputs(inp, repeats=3)
    assert res["ranking"].index("_fast") < res["ranking"].index("_slow")
    assert res["ms"]["_slow"] >= 4.0 and set(res["ms"]) >= {"_slow", "_fast"}
    assert D.ranking(inp)[1] == "tuned"
    D.clear_decisions()
    with D.tuning():  # first eager call of the class times, then every call uses the result
        A.varlen_attention(inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, 4, 4, segments=inp.segments)
    assert D.ranking(inp)[1] == "tuned"
    # CPU rankings stay in memory; a GPU's go to disk, keyed by GPU and versions
    assert not list(tmp_path.iterdir())
    assert "dispatch-cpu-torch" in D.cache_path() and str(tmp_path) in D.cache_path()
    D._disk_cache()["k"] = ["torch"]
    D._save_disk_cache()
    with open(D.cache_path()) as f:
        assert json.load(f) == {"k": ["torch"]}


def test_saving_the_tuning_cache_keeps_what_other_processes_wrote_since(monkeypatch, tmp_path):
    """Processes tuning at once (ELIT_TUNE=1 under torchrun) share one cache file: each save merges into the file
    as it is now instead of replacing it with the view read at start-up (a hostile-user round found the first
    writer's classes lost). For a class both hold, the file wins unless this process tuned it."""
    monkeypatch.setenv("ELIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(D, "_DISK", None)
    monkeypatch.setattr(D, "_OWN", set())
    assert D._disk_cache() == {}  # this process starts: an empty cache

    def other_process_writes(entries):
        with open(D.cache_path(), "w") as f:
            json.dump(entries, f)

    other_process_writes({"theirs": ["sdpa_cudnn"], "both_tuned": ["triton"], "they_retuned": ["new"]})
    D._disk_cache().update({"they_retuned": ["stale"]})  # read by this process before the other retuned it
    for key, order in (("mine", ["torch"]), ("both_tuned", ["torch_varlen"])):  # what tune_inputs records
        D._disk_cache()[key] = order
        D._OWN.add(key)
    D._save_disk_cache()
    with open(D.cache_path()) as f:
        assert json.load(f) == {"theirs": ["sdpa_cudnn"], "mine": ["torch"], "both_tuned": ["torch_varlen"],
                                "they_retuned": ["new"]}
    assert D._disk_cache()["theirs"] == ["sdpa_cudnn"] and D._disk_cache()["they_retuned"] == ["new"]
    # a damaged file is replaced by this process's entries
    with open(D.cache_path(), "w") as f:
        f.write("{not json")
    with pytest.warns(RuntimeWarning, match="the tuning cache .* could not be read"):
        D._save_disk_cache()
    with open(D.cache_path()) as f:
        assert json.load(f)["mine"] == ["torch"]


def test_tuning_ranks_by_time_passes_repeats_and_drops_the_devices_earlier_decisions(monkeypatch):
    inp = _inp()
    seen = []

    def fake_times(i, repeats):
        seen.append(repeats)
        return {"zz_fast": 1.0, "aa_slow": 3.0, "mm_mid": 2.0}  # names out of time order

    monkeypatch.setattr(D, "time_backends", fake_times)
    D.clear_decisions()
    D.select_backend(inp)  # a decision for this device, made before the ranking existed
    other = ("not-a-device",) + (None,) * 5
    D._DECISIONS[other] = R.get_backend("reference")  # another device's decision
    assert any(k[0] == inp.q.device for k in D._DECISIONS)
    res = D.tune_inputs(inp, repeats=1, save=False)  # one repeat is allowed
    assert seen == [1] and res["ranking"] == ["zz_fast", "mm_mid", "aa_slow"]
    assert res["class"] == D.shape_class(inp) and res["ms"] == fake_times(inp, 1)
    assert not any(k[0] == inp.q.device for k in D._DECISIONS), "decisions made before tuning must go"
    assert other in D._DECISIONS, "another device's decisions stay"
    D.clear_decisions()


def test_tuning_arguments_are_named_and_numpy_scalars_taken(monkeypatch):
    import numpy as np

    with pytest.raises(TypeError, match=r"^inp: expected an AttnInputs \(elit_kernels.attention.validate_inputs"):
        D.tune_inputs("not inputs")
    with pytest.raises(TypeError, match="^save: expected a bool, got str"):
        D.tune_inputs(_inp(), repeats=1, save="no")
    with pytest.raises(ValueError, match=r"^repeats: expected an int >= 1, got np.int64\(0\)"):
        D.tune_inputs(_inp(), repeats=np.int64(0))
    assert D.tune_inputs(_inp(), repeats=np.int64(1), save=np.False_)["ranking"]  # NumPy scalars are numbers
    with pytest.raises(TypeError, match=r"^enabled: expected a bool, got str \(.*\)$"):
        with D.tuning("yes"):
            pass
    with D.tuning(np.True_):
        assert D._tuning is True


def test_a_cache_file_nested_past_the_json_parsers_depth_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("ELIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(D, "_DISK", None)
    os.makedirs(os.path.dirname(D.cache_path()), exist_ok=True)
    with open(D.cache_path(), "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)  # json.load raises RecursionError, not ValueError
    assert D._disk_cache() == {}


def test_tuning_refuses_under_compile():
    inp = _inp()

    def f():
        return D.tune_inputs(inp)

    with pytest.raises(Exception, match="tune_inputs: cannot time backends under torch.compile"):
        torch.compile(f, backend="eager", fullgraph=True)()


# --- the model forward reads nothing from the device ------------------------------------------------------
@pytest.mark.parametrize("preset", ["paper", "released"])
@pytest.mark.parametrize("budgets", [[4, 4, 4, 4], [4, 1, 2, 0], [4, 4, 1, 1]], ids=["uniform", "mixed", "ccfg"])
def test_model_forward_on_meta_reads_no_device_data(preset, budgets):
    """The meta device refuses .item()/.tolist()/.cpu() of its tensors: a forward that runs there has no host
    read of device data, so it has no device sync on a GPU either."""
    from elit_kernels.models import ElitDiT
    from elit_kernels.models.config import preset_config

    with pytest.raises(Exception):
        torch.zeros(2, device="meta").tolist()  # the premise
    cfg = preset_config(preset, "tiny", 64)
    with torch.device("meta"):
        m = ElitDiT(cfg)
    m.reset_buffers(torch.device("meta"))
    x = torch.empty(4, cfg.in_channels, cfg.input_size, cfg.input_size, device="meta")
    t = torch.empty(4, device="meta")
    y = torch.empty(4, dtype=torch.long, device="meta")
    out = m(x, t, y, budgets)
    assert out.shape == x.shape and out.device.type == "meta"


@pytest.mark.parametrize("budgets", [[4, 4, 4], [4, 1, 2], [4, 4, 1]], ids=["uniform", "mixed", "ccfg"])
def test_model_compiles_without_graph_breaks(budgets):
    from torch._dynamo.testing import CompileCounter

    from elit_kernels.models import ElitDiT
    from elit_kernels.models.config import preset_config

    for preset in ("paper", "released"):
        cfg = preset_config(preset, "tiny", 64)
        torch.manual_seed(0)
        m = ElitDiT(cfg)
        for p in m.parameters():
            p.data.normal_(0, 0.2)
        x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size)
        t, y = torch.rand(3), torch.tensor([1, 2, cfg.num_classes])
        cnt = CompileCounter()
        torch._dynamo.reset()
        compiled = torch.compile(m, backend=cnt, fullgraph=True)
        with torch.no_grad():
            got, want = compiled(x, t, y, budgets), m(x, t, y, budgets)
        assert cnt.frame_count == 1, f"{preset}: {cnt.frame_count} graphs"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- the package's structure ------------------------------------------------------------------------------
def _imports(path: pathlib.Path, pkg_root: pathlib.Path) -> set[str]:
    """Modules of elit_kernels that ``path`` imports (absolute or relative, at any depth in the file)."""
    mod = ".".join(path.relative_to(pkg_root.parent).with_suffix("").parts)
    if mod.endswith(".__init__"):
        mod = mod[: -len(".__init__")]
        pkg = mod
    else:
        pkg = mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("elit_kernels")}
    return out


def test_package_import_graph_has_no_cycle_and_kernels_do_not_import_the_model():
    pkg_root = ROOT / "elit_kernels"
    modules = {}
    for p in pkg_root.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = p
    graph = {m: {t for t in _imports(p, pkg_root) if t in modules and t != m} for m, p in modules.items()}
    # a package imports its own submodules to register them: an edge parent -> child is not a cycle
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, t]))
            if not state.get(t):
                visit(t, stack + [m])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [])
    assert not any(t.startswith("elit_kernels.models") for t in graph["elit_kernels._cext"])
    for m in graph:
        if m.startswith("elit_kernels.attention"):
            assert not any(t.startswith("elit_kernels.models") for t in graph[m]), m


def test_every_backend_lives_in_the_backends_package():
    builtin = [b for b in R.registered_backends() if type(b).__module__.startswith("elit_kernels")]
    assert {b.name for b in builtin} >= {"reference", "torch", "triton", "cuda", "cpp", "torch_varlen", "flash_attn"}
    for b in builtin:  # tests register their own backends; the package's all live in one place
        mod = type(b).__module__
        assert mod.startswith("elit_kernels.attention.backends."), (b.name, mod)
    assert elit_kernels.known_backends() == R.known_backends()


def test_the_0_1_import_paths_still_work():
    # code written against 0.1 imported the registry from elit_kernels.backends and the README documented
    # elit_kernels.known_answer.verify_backend: the same objects, re-exported
    from elit_kernels import backends as old_b, known_answer as old_ka
    from elit_kernels.attention import known_answer as KA

    assert old_b.Backend is R.Backend and old_b.register_backend is R.register_backend
    assert old_b.select_backend is D.select_backend and old_b.get_backend("torch") is R.get_backend("torch")
    assert old_ka.verify_backend is KA.verify_backend and old_ka.set_known_answer_checks is KA.set_known_answer_checks


def test_a_damaged_table_or_cache_is_warned_about_and_left_out(tmp_path, monkeypatch):
    good = {"gpu": "G", "dtype": "bfloat16", "kind": "uniform", "grad": False, "head_dim": 72, "lq": 64, "lk": 64,
            "segments": 256, "ranking": ["torch"]}
    for text, n_good, warns in (("{not json", 0, "could not be read"), ('["a"]', 0, "could not be read"),
                                ("[" * 100000 + "]" * 100000, 0, "RecursionError"),  # raised out of dispatch before
                                (json.dumps({"entries": [good, {**good, "lq": "64"}, {**good, "ranking": "torch"}, 3]}),
                                 1, "3 of 4 entries are malformed")):
        p = tmp_path / "t.json"
        p.write_text(text)
        with pytest.warns(RuntimeWarning, match=warns):
            t = D._load_table(str(p))
        assert len(t["entries"]) == n_good
    assert D._load_table(str(tmp_path / "missing.json")) == {"entries": []}  # no table: no warning, static order
    monkeypatch.setenv("ELIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(D, "_DISK", None)
    import os

    os.makedirs(os.path.dirname(D.cache_path()), exist_ok=True)
    with open(D.cache_path(), "w") as f:
        json.dump({"a": ["torch"], "b": "torch", "c": [1]}, f)
    assert D._disk_cache() == {"a": ["torch"]}
    with open(D.cache_path(), "w") as f:  # a hand edit with a syntax error was dropped without a word
        f.write('{"a": ["torch"],}')
    monkeypatch.setattr(D, "_DISK", None)
    with pytest.warns(RuntimeWarning, match=r"the tuning cache .* could not be read \(JSONDecodeError"):
        assert D._disk_cache() == {}
    # times of an absurd size in a hand-edited table rank by position, not by an overflowing division
    huge = [{**good, "ranking": ["b", "a"], "ms": {"a": 10**400, "b": 1.0}},
            {**good, "ranking": ["b", "a"], "ms": {"a": 10**400, "b": 2.0}}]
    assert D._merged_ranking(huge) == ["b", "a"]
    monkeypatch.setenv("ELIT_CACHE_DIR", " ~/elit-cache ")  # stripped and expanded as the CLIs' paths are
    assert D.cache_path().startswith(os.path.join(os.path.expanduser("~"), "elit-cache") + os.sep)
    with pytest.raises(ValueError, match=r"^repeats: expected an int >= 1, got 0"):
        D.time_backends(_inp(), repeats=0)


def test_registry_tuning_and_environment_arguments_are_checked(monkeypatch):
    class _B(R.Backend):
        pass

    for name, prio, err, match in ((None, 1, TypeError, "backend: name must be a str, got NoneType"),
                                   (5, 1, TypeError, "backend: name must be a str, got int"),
                                   ("", 1, ValueError, "backend: name must be a non-empty str"),
                                   (" x", 1, ValueError, "without '\\+' or surrounding spaces"),
                                   ("a+graph", 1, ValueError, "without '\\+'"),
                                   ("_x", "high", TypeError, "backend: priority must be a number, got str"),
                                   ("_x", float("nan"), ValueError, "backend: priority must be a finite number")):
        b = _B()
        b.name, b.priority = name, prio
        with pytest.raises(err, match=match):
            R.register_backend(b)
    assert "_x" not in R.known_backends()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="repeats: expected an int >= 1"):
            D.tune_inputs(_inp(), repeats=bad)
    with pytest.raises(TypeError, match="enabled: expected a bool, got str"):
        with D.tuning("no"):
            pass
    monkeypatch.setenv("ELIT_BACKEND", "garbage")
    with pytest.raises(ValueError, match=r"^ELIT_BACKEND='garbage': unknown backend 'garbage'; known backends"):
        A.select_backend(_inp())
    monkeypatch.setenv("ELIT_BACKEND", " torch\n")  # spaces around a name, as a shell script may leave them
    assert A.select_backend(_inp()).name == "torch"
    monkeypatch.setenv("ELIT_BACKEND", "  ")  # blank: as if unset
    blank = A.select_backend(_inp()).name
    monkeypatch.delenv("ELIT_BACKEND")
    assert blank == A.select_backend(_inp()).name


@pytest.mark.parametrize("field,value,err,match", [
    ("dtypes", "float32", TypeError, r"^backend: dtypes must be a non-empty tuple of torch dtypes.*got str \('float32'\)"),
    ("dtypes", (), TypeError, "^backend: dtypes must be a non-empty tuple"),
    ("dtypes", ("float32",), TypeError, "^backend: dtypes must be"),
    ("devices", "cuda", TypeError, "^backend: devices must be None .*got str"),
    ("head_dims", 64, TypeError, r"^backend: head_dims must be None \(every multiple of head_dim_multiple\) or a non-empty tuple of ints >= 1, got int"),
    ("head_dims", (64, 0), TypeError, "^backend: head_dims must be"),
    ("head_dim_multiple", 0, ValueError, "^backend: head_dim_multiple must be an int >= 1, got int"),
    ("max_head_dim", 128.0, ValueError, "^backend: max_head_dim must be an int >= 1"),
    ("supports_gqa", "yes", TypeError, "^backend: supports_gqa must be a bool"),
    ("default_eligible", 1, TypeError, "^backend: default_eligible must be a bool"),
    ("min_compute_capability", 8, TypeError, r"^backend: min_compute_capability must be None or \(major, minor\)"),
    ("description", None, TypeError, "^backend: description must be a str"),
])
def test_a_badly_declared_backend_is_refused_at_registration(field, value, err, match):
    """Each declared field is checked by register_backend: a wrong one used to be accepted and then broke default
    dispatch for every call (a TypeError from inside another backend's not_supported_reasons)."""
    class _B(R.Backend):
        name, priority = "_bad_decl", -50

        def forward(self, inp):
            return R.get_backend("reference").forward(inp)

    b = _B()
    setattr(b, field, value)
    with pytest.raises(err, match=match):
        R.register_backend(b)
    assert "_bad_decl" not in R.known_backends()


def test_a_backend_whose_own_checks_raise_is_skipped_not_fatal():
    """A registered backend whose is_available() or not_supported_reasons() raises is unavailable (the exception is
    its reason): describe_backends works and default dispatch runs on the others, with the reference's numbers."""
    from elit_kernels.attention import varlen_attention
    from elit_kernels.reference.attention import varlen_attention_reference

    class _Raises(R.Backend):
        name, priority = "_raises_avail", 1e9

        def is_available(self):
            raise RuntimeError("driver not loaded")

        def forward(self, inp):
            raise AssertionError("never run")

    class _RaisesCheck(_Raises):
        name = "_raises_check"

        def is_available(self):
            return True

        def not_supported_reasons(self, inp):
            raise KeyError("oops")

    made = [R.register_backend(_Raises()), R.register_backend(_RaisesCheck())]
    try:
        rows = {r["name"]: r for r in R.describe_backends(_inp())}
        assert rows["_raises_avail"]["available"] is False
        assert rows["_raises_avail"]["unavailable_reason"] == "its is_available() raised RuntimeError: driver not loaded"
        assert rows["_raises_check"]["reasons"] == ["its not_supported_reasons() raised KeyError: 'oops'"]
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(9, 2, 16, generator=g) for _ in range(3))
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        torch.testing.assert_close(varlen_attention(q, k, v, cu, cu, 5, 5),
                                   varlen_attention_reference(q, k, v, cu, cu, softmax_scale=0.25))
    finally:
        for b in made:
            R._REGISTRY.pop(b.name, None)
        D.clear_decisions()


def test_table_ranking_takes_the_nearest_entry_of_the_same_class_on_a_log_scale():
    from elit_kernels.attention.dispatch import table_ranking

    c = {"gpu": "Test GPU", "dtype": "bfloat16", "kind": "ragged", "grad": False, "head_dim": 64, "lq": 1024,
         "lk": 1024, "segments": 1}

    def entry(ranking, **kw):
        return {"gpu": "Test GPU", "dtype": "bfloat16", "kind": "ragged", "grad": False, "head_dim": 64, "lq": 1024,
                "lk": 1024, "segments": 1, "ranking": ranking, **kw}

    # the nearest length bucket wins (|log2 512 - log2 1024| = 1 against 6 for 16), whatever the order
    far, near = entry(["far"], lq=16), entry(["near"], lq=512)
    assert table_ranking(c, {"entries": [far, near]}) == ["near"] == table_ranking(c, {"entries": [near, far]})
    # the pass must match: a forward-only class never takes a forward + backward ranking, and the reverse
    both = {"entries": [entry(["fwd"]), entry(["fwd+bwd"], grad=True)]}
    assert table_ranking(c, both) == ["fwd"] and table_ranking({**c, "grad": True}, both) == ["fwd+bwd"]
    assert table_ranking(c, {"entries": [entry(["bwd"], grad=True)]}) is None
    # a field an entry leaves out counts as 1, as the class's own 1 does: distance 0, ahead of a one-step miss
    exact_but_bare = {k: v for k, v in entry(["bare"]).items() if k != "segments"}
    one_off = entry(["one-off"], lq=2048)
    assert table_ranking(c, {"entries": [one_off, exact_but_bare]}) == ["bare"]
    assert table_ranking(c, {"entries": [one_off, entry(["exact"])]}) == ["exact"]
    # one segment is bucket 1 on both sides (log 0): an entry of 2 segments is one step away, not nearer
    assert table_ranking(c, {"entries": [entry(["two"], segments=2), entry(["one"])]}) == ["one"]
    # other GPUs, dtypes or kinds: no ranking; an explicit table is used instead of the committed one
    assert table_ranking({**c, "gpu": "Other"}, {"entries": [near]}) is None
    assert table_ranking({**c, "kind": "uniform"}, {"entries": [near]}) is None
    assert table_ranking(c, {}) is None and table_ranking(c, {"entries": []}) is None


def test_entries_of_one_class_rank_together_not_first_found():
    """The committed table measures Read and Write at J = P = 64 (64 x 64, 256 segments) and the spatial blocks
    and a uniform core (1024 x 1024, 16 segments): one class each, measured twice. Dispatch used the first entry
    and never the second (a hostile-user round found Write's forward measured fastest on sdpa_flash, run on
    torch). They now rank by the summed time over each entry's fastest."""
    from elit_kernels.attention.dispatch import _load_table, table_ranking

    c = {"gpu": "G", "dtype": "bfloat16", "kind": "uniform", "grad": False, "head_dim": 72, "lq": 64, "lk": 64,
         "segments": 256}

    def entry(ms, **kw):
        return {**c, "ranking": sorted(ms, key=ms.get), "ms": ms, **kw}

    a = entry({"x": 1.0, "y": 1.05, "z": 2.0})
    b = entry({"y": 1.0, "x": 1.2, "z": 1.1})  # x: 1 + 1.2 = 2.2, y: 1.05 + 1 = 2.05, z: 2 + 1.1 = 3.1
    assert table_ranking(c, {"entries": [a, b]}) == ["y", "x", "z"] == table_ranking(c, {"entries": [b, a]})
    # a backend one entry did not time counts as that entry's slowest; without times, the mean position
    partial = entry({"x": 1.0, "y": 3.0})  # z counts 3 here: x 1 + 1.5, z 3 + 1, y 3 + 2
    assert table_ranking(c, {"entries": [partial, entry({"z": 1.0, "x": 1.5, "y": 2.0})]}) == ["x", "z", "y"]
    untimed = [{**c, "ranking": ["p", "q", "r"]}, {**c, "ranking": ["q", "p", "r"]}, {**c, "ranking": ["q", "r"]}]
    assert table_ranking(c, {"entries": untimed}) == ["q", "p", "r"]
    # an entry one step away does not join the class's own entries
    assert table_ranking(c, {"entries": [a, entry({"z": 1.0}, lq=128)]}) == ["x", "y", "z"]
    # the committed table: every class measured more than once ranks by its entries' summed relative times
    entries = _load_table()["entries"]
    groups = {}
    for e in entries:
        key = (e["gpu"], e["dtype"], e["kind"], e["grad"], e["head_dim"], e["lq"], e["lk"], e["segments"])
        groups.setdefault(key, []).append(e)
    merged = [g for g in groups.values() if len(g) > 1]
    assert merged, "the committed table has a class measured twice (Read / Write at J = 64)"
    for g in merged:
        names = set().union(*(e["ms"] for e in g))
        want = min(names, key=lambda n: sum(e["ms"].get(n, max(e["ms"].values())) / min(e["ms"].values())
                                            for e in g))
        cls = {k: g[0][k] for k in ("gpu", "dtype", "kind", "grad", "head_dim", "lq", "lk", "segments")}
        assert table_ranking(cls)[0] == want, [e["shape"] for e in g]


def test_backend_timing_is_the_median_in_milliseconds_after_two_warmups():
    import time as _t

    durations = iter([0.0, 0.0, 0.001, 0.040, 0.020, 0.030, 0.010])  # two warm-ups, then five timed calls
    ms = D._time_ms(lambda: _t.sleep(next(durations)), 5)
    assert 19.0 <= ms < 29.0, f"median of 1, 40, 20, 30, 10 ms should be ~20 ms, got {ms:.1f}"


def test_backend_timing_uses_the_host_clock_for_cpu_inputs_when_cuda_is_up(monkeypatch):
    """Once CUDA is initialised in the process (a model on the GPU elsewhere), CPU work timed between two CUDA
    events measures ~0 ms for every backend: the clock follows the inputs' device;
    found reading the GPU-only code paths, 2026-12-07."""
    import time as _t

    def no_events(*a, **k):
        raise AssertionError("CUDA events used to time CPU work")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", no_events)
    ms = D._time_ms(lambda: _t.sleep(0.005), 3, torch.device("cpu"))
    assert 4.0 <= ms < 50.0, ms
    with pytest.raises(AssertionError, match="CUDA events"):
        D._time_ms(lambda: None, 1, "cuda:0")  # CUDA inputs: the events


def test_tuning_with_return_lse_and_gradients_ranks_the_backends():
    """``(out, lse)`` with gradients: the backward is taken from out; before, autograd.grad got the tuple with one
    gradient, every backend raised and an empty ranking was cached;
    found reading the GPU-only code paths, 2026-12-07."""
    import warnings

    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 4, 4], [4, 4, 4], 2, 16, seed=3, requires_grad=True)
    inp = A.validate_inputs(q, k, v, cq, ck, mq, mk, None, False, return_lse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms = D.time_backends(inp, repeats=1)
    assert ms and all(v > 0 for v in ms.values()), ms


def test_tuning_cache_path_default_location_and_file_name(monkeypatch, tmp_path):
    # without ELIT_CACHE_DIR: ~/.cache/elit_kernels; the file name keys GPU and versions, with every character a
    # file name should not hold made "_"
    import os

    monkeypatch.delenv("ELIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130 a/b")
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    assert all(ch.isalnum() or ch in "-_." for ch in tv), tv
    want = os.path.join(str(tmp_path), ".cache", "elit_kernels", f"dispatch-cpu-torch2.14.1_cu130_a_b-triton{tv}.json")
    assert D.cache_path() == want
    monkeypatch.setenv("ELIT_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert D.cache_path() == os.path.join(str(tmp_path / "elsewhere"), os.path.basename(want))


@pytest.mark.parametrize("text", ["[1, 2]", "not json", '{"k": ["torch"], "bad": "torch", "mixed": ["torch", 3]}'])
def test_a_damaged_tuning_cache_is_read_as_what_it_holds_that_is_usable(monkeypatch, tmp_path, text):
    monkeypatch.setenv("ELIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(D, "_DISK", None)
    pathlib.Path(D.cache_path()).write_text(text)
    assert D._disk_cache() == ({"k": ["torch"]} if text.startswith("{") else {})
    monkeypatch.setattr(D, "_DISK", None)


def test_few_runs_boundary_and_the_static_order_of_a_cuda_class():
    # FEW_RUNS runs of equal segments still count as "runs" (one dense SDPA each); one more is "ragged"
    n = D.FEW_RUNS
    few = _inp(tuple(range(1, n + 1)), tuple(range(1, n + 1)))
    many = _inp(tuple(range(1, n + 2)), tuple(range(1, n + 2)))
    assert len(few.segments.runs) == n and D.shape_class(few)["kind"] == "runs"
    assert D.shape_class(many)["kind"] == "ragged"
    # the static order of a CUDA call, read on a CPU: AttnInputs whose q only says it is on a GPU (static_order
    # reads q's device and dtype, nothing on the device)
    import dataclasses
    import types

    def on_gpu(inp, dtype):
        fake_q = types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=inp.q.shape,
                                       requires_grad=False)
        return dataclasses.replace(inp, q=fake_q)

    assert D.static_order(on_gpu(few, torch.bfloat16))[:2] == ["torch", "sdpa_cudnn"]
    assert D.static_order(on_gpu(few, torch.float32))[:3] == ["torch", "sdpa_efficient", "triton"]
    assert D.static_order(on_gpu(many, torch.bfloat16))[:3] == ["torch_varlen", "triton", "torch"]
    assert D.static_order(on_gpu(many, torch.float32))[:2] == ["torch", "triton"]
    order = D.static_order(on_gpu(many, torch.bfloat16))
    assert sorted(order) == sorted(R.known_backends()), "every backend once"
    assert order.index("triton_window") > max(order.index(b) for b in ("torch", "torch_varlen", "triton"))
    assert order[-1] == "reference"


def _on_gpu(inp, dtype=None, index=None):
    """``inp`` with a q that says it is on a GPU (the ranking functions read q's device and dtype only)."""
    import dataclasses
    import types

    q = types.SimpleNamespace(device=torch.device("cuda", index) if index is not None else torch.device("cuda"),
                              dtype=dtype or inp.q.dtype, shape=inp.q.shape, requires_grad=False)
    return dataclasses.replace(inp, q=q)


def test_gpu_name_is_read_once_per_cuda_device_and_cpu_is_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(D, "_gpu_name", lambda device: calls.append(str(device)) or f"GPU of {device}")
    monkeypatch.setattr(D, "_GPU_NAMES", {})
    assert D.gpu_name(torch.device("cpu")) == "cpu" and calls == []
    assert D.gpu_name(torch.device("cuda", 1)) == "GPU of cuda:1"
    assert D.gpu_name(torch.device("cuda", 1)) == "GPU of cuda:1" and calls == ["cuda:1"]  # cached
    assert D.gpu_name(torch.device("cuda", 0)) == "GPU of cuda:0" and calls == ["cuda:1", "cuda:0"]


def test_shape_class_records_the_head_dim_and_a_symbolic_one_as_minus_one():
    import dataclasses
    import types

    inp = _inp()
    assert D.shape_class(inp)["head_dim"] == 16
    symbolic = types.SimpleNamespace(device=inp.q.device, dtype=inp.q.dtype, shape=(12, 2, object()),
                                     requires_grad=False)
    assert D.shape_class(dataclasses.replace(inp, q=symbolic))["head_dim"] == -1


def test_ranking_of_a_cuda_class_reads_memory_then_the_disk_cache_then_the_table(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "gpu_name", lambda device: "Test GPU")
    monkeypatch.setenv("ELIT_CACHE_DIR", str(tmp_path))
    inp = _on_gpu(_inp(dtype=torch.bfloat16))
    key = D._class_key(D.shape_class(inp))
    entry = {**D.shape_class(inp), "ranking": ["triton", "torch_varlen"]}
    table_file = tmp_path / "table.json"
    table_file.write_text(json.dumps({"entries": [entry]}))
    monkeypatch.setattr(D, "_TABLE_PATH", str(table_file))
    monkeypatch.setattr(D, "_TABLE", None)  # read from the file on first use
    monkeypatch.setattr(D, "_DISK", None)
    monkeypatch.setattr(D, "_TUNED", {})
    order, src = D.ranking(inp)
    assert (src, order[:2]) == ("table", ["triton", "torch_varlen"]) and D._TABLE["entries"] == [entry]
    pathlib.Path(D.cache_path()).write_text(json.dumps({repr(key): ["cuda", "triton"]}))
    monkeypatch.setattr(D, "_DISK", None)  # read from the file on first use
    order, src = D.ranking(inp)
    assert (src, order[:2]) == ("tuned", ["cuda", "triton"])
    D._TUNED[key] = ["sdpa_flash"]  # tuned in this process: ahead of the disk cache
    assert D.ranking(inp)[0][0] == "sdpa_flash" and D.ranking(inp)[1] == "tuned"
    # a CPU class never reads the disk cache or the table, even when they hold its key
    cpu = _inp(dtype=torch.bfloat16)
    monkeypatch.setattr(D, "gpu_name", lambda device: "cpu")
    ckey = D._class_key(D.shape_class(cpu))
    D._DISK[repr(ckey)] = ["cuda"]
    D._TABLE["entries"].append({**D.shape_class(cpu), "ranking": ["cuda"]})
    assert D.ranking(cpu) == (D.static_order(cpu), "static")


def test_ranking_while_tracing_uses_what_was_loaded_and_reads_no_file(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "gpu_name", lambda device: "Test GPU")
    monkeypatch.setenv("ELIT_CACHE_DIR", str(tmp_path))
    inp = _on_gpu(_inp(dtype=torch.bfloat16))
    c = D.shape_class(inp)
    key = D._class_key(c)
    pathlib.Path(D.cache_path()).write_text(json.dumps({repr(key): ["cuda"]}))
    table_file = tmp_path / "table.json"
    table_file.write_text(json.dumps({"entries": [{**c, "ranking": ["triton"]}]}))
    monkeypatch.setattr(D, "_TABLE_PATH", str(table_file))
    monkeypatch.setattr(D, "_TUNED", {})
    monkeypatch.setattr(D, "_DISK", None)
    monkeypatch.setattr(D, "_TABLE", None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert D.ranking(inp) == (D.static_order(inp), "static")  # nothing loaded: the files stay unread
    assert D._DISK is None and D._TABLE is None
    monkeypatch.setattr(D, "_TABLE", {"entries": [{**c, "ranking": ["sdpa_flash"]}]})
    order, src = D.ranking(inp)
    assert (src, order[0]) == ("table", "sdpa_flash")  # what an eager call loaded
    monkeypatch.setattr(D, "_DISK", {repr(key): ["sdpa_cudnn"]})
    order, src = D.ranking(inp)
    assert (src, order[0]) == ("tuned", "sdpa_cudnn")


def test_the_committed_table_is_cached_and_another_file_is_not(monkeypatch, tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"entries": []}))
    committed = tmp_path / "committed.json"
    committed.write_text(json.dumps({"device": "x", "entries": []}))
    monkeypatch.setattr(D, "_TABLE_PATH", str(committed))
    monkeypatch.setattr(D, "_TABLE", None)
    D._load_table(str(mine))
    assert D._TABLE is None  # an explicit file is read, not kept as the committed table
    t = D._load_table()
    assert D._TABLE is t and t["device"] == "x"
    committed.write_text(json.dumps({"device": "changed", "entries": []}))
    assert D._load_table()["device"] == "x"  # read once


def test_a_decision_is_cached_per_key_and_never_while_capturing(fakes, monkeypatch):
    inp = _inp()
    calls = []
    real = D.ranking
    monkeypatch.setattr(D, "ranking", lambda i: calls.append(1) or real(i))
    first = D.select_backend(inp)
    assert D.select_backend(inp) is first and len(calls) == 1  # the second call is a dictionary lookup
    assert list(D._DECISIONS.values()) == [first]
    D.clear_decisions()
    monkeypatch.setattr(D, "_capturing", lambda: True)
    assert D.select_backend(inp) is first and D.select_backend(inp) is first
    assert len(calls) == 3 and D._DECISIONS == {}  # ranked each time, nothing cached under capture


def test_cached_decisions_are_bounded_when_every_call_has_new_lengths(monkeypatch):
    """A flash-attn drop-in caller packs a new batch each step: a new max_seqlen and segment count per call, each a
    new decision key. The cache keeps the newest ``_MAX_DECISIONS`` (it grew without bound), and a call whose
    decision was dropped is decided again, the same."""
    monkeypatch.setattr(D, "_MAX_DECISIONS", 8)
    D.clear_decisions()
    q = torch.randn(40, 2, 16)

    def inputs(n):
        cu = torch.tensor([0, n], dtype=torch.int32)
        return (q[:n], q[:n], q[:n], cu, cu, n, n)

    picks = []
    for n in range(1, 21):
        torch.testing.assert_close(A.varlen_attention(*inputs(n)), A.varlen_attention(*inputs(n), backend="reference"))
        picks.append(D.select_backend(A.validate_inputs(*inputs(n))).name)
        assert 1 <= len(D._DECISIONS) <= 8
    assert D._decision_key(A.validate_inputs(*inputs(20))) in D._DECISIONS  # the newest kept
    first = D._decision_key(A.validate_inputs(*inputs(1)))
    assert first not in D._DECISIONS  # the oldest dropped
    assert D.select_backend(A.validate_inputs(*inputs(1))).name == picks[0] and first in D._DECISIONS  # decided again


def test_few_packed_sequences_with_new_lengths_each_call_are_one_decision(monkeypatch):
    """A direct call's value checks give it host-side segments; two packed sequences whose split moves every step
    must not be a new decision (candidates, ranking, known-answer lookup) per step: the key holds the segments'
    run count and length buckets, not the exact runs."""
    D.clear_decisions()
    calls = []
    real = D.ranking
    monkeypatch.setattr(D, "ranking", lambda i: calls.append(1) or real(i))
    q = torch.randn(96, 2, 16)
    picks = set()
    for a in [*range(40, 48), *range(49, 57)]:  # not 48: two equal segments are one run
        cu = torch.tensor([0, a, 96], dtype=torch.int32)
        inp = A.validate_inputs(q, q, q, cu, cu, 96, 96, None, False)
        assert inp.segments is not None and len(inp.segments.runs) == 2
        picks.add(D.select_backend(inp).name)
    assert len(calls) == 1 and len(D._DECISIONS) == 1 and len(picks) == 1, (calls, D._DECISIONS)


@pytest.mark.parametrize("kw, kind", [({}, "uniform"), (dict(causal=True), "uniform"), (dict(return_lse=True), "ragged"),
                                      (dict(softcap=5.0), "ragged"), (dict(window_size=(2, 2)), "ragged")])
def test_a_few_runs_class_is_only_a_call_the_dense_path_runs_as_plain_sdpa(kw, kind):
    """Uniform segments with an LSE, a softcap or a window are not what the uniform class measured (plain SDPA on
    views): ranked as ragged, as the static order already did for LSE and softcap; causal counts as uniform only
    where every segment is square."""
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([8] * 4, [8] * 4, 2, 16, seed=1)
    assert D.shape_class(A.validate_inputs(q, k, v, cq, ck, mq, mk, **kw))["kind"] == kind
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4] * 4, [8] * 4, 2, 16, seed=1)
    assert D.shape_class(A.validate_inputs(q, k, v, cq, ck, mq, mk, **kw))["kind"] == \
        ("ragged" if kw.get("causal") else kind)  # bottom-right causal on 4 x 8: SDPA needs a mask


def test_a_call_made_before_a_tuning_block_is_timed_inside_it(monkeypatch):
    """The usual order: a warm-up forward, then ``tuning()``. The warm-up's cached decision must not answer the
    same call inside the block, or its shape class would never be timed (a hostile-user round found that)."""
    inp = _inp()
    timed = []

    def fake_times(i, repeats):
        timed.append(D.shape_class(i))
        return {"torch": 2.0, "reference": 1.0}

    monkeypatch.setattr(D, "time_backends", fake_times)
    D.clear_decisions()
    before = D.select_backend(inp)  # cached for the class, untuned
    assert D.select_backend(inp) is before and timed == []
    with D.tuning():
        assert D.select_backend(inp).name == "reference"  # the ranking the block measured
    assert timed == [D.shape_class(inp)]
    assert D.select_backend(inp).name == "reference" and D.ranking(inp)[1] == "tuned"  # it outlives the block
    with D.tuning():  # a class already tuned is not timed again
        D.select_backend(inp)
    assert len(timed) == 1
    D.clear_decisions()


def test_tuning_runs_only_when_there_is_a_choice(monkeypatch):
    inp = _inp()
    tuned = []
    monkeypatch.setattr(D, "tune_inputs", lambda i: tuned.append(i))
    monkeypatch.setattr(D, "_tuning", True)
    ref, torch_b = R.get_backend("reference"), R.get_backend("torch")
    for ok, want in (([ref], 0), ([ref, torch_b], 1)):
        D.clear_decisions()
        monkeypatch.setattr(D, "candidates", lambda i, ok=ok: (list(ok), []))
        tuned.clear()
        D.select_backend(inp)
        assert len(tuned) == want, [b.name for b in ok]
    D.clear_decisions()


def test_every_candidate_failing_its_known_answer_check_is_named_in_the_error(monkeypatch):
    monkeypatch.setattr(D, "check_dispatch", lambda b, inp: "max |error| 1.0")
    D.clear_decisions()
    with pytest.raises(ValueError, match=r"no backend supports these inputs") as e:
        D.select_backend(_inp())
    assert "  reference: failed its known-answer check: max |error| 1.0" in str(e.value)
    assert "  torch: failed its known-answer check: max |error| 1.0" in str(e.value)


def test_timing_defaults_and_the_backward_is_timed_when_gradients_are_needed(monkeypatch, tmp_path):
    seen = []

    def fake_time(fn, repeats, device=None):
        seen.append(repeats)
        fn()
        return 1.0

    grads = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(1) or real_grad(*a, **k))
    monkeypatch.setattr(D, "_time_ms", fake_time)
    real_candidates = D.candidates  # the package's own backends only (a test's spy need not have a backward)
    monkeypatch.setattr(D, "candidates", lambda i: ([b for b in real_candidates(i)[0]
                                                     if type(b).__module__.startswith("elit_kernels.")], []))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a backend that fails to time is dropped with a warning: none may
        ms = D.time_backends(_inp())
        assert ms and all(r == 10 for r in seen) and grads == []  # forward only
        seen.clear()
        ms_grad = D.time_backends(_inp(grad=True), repeats=2)
    assert set(ms_grad) == set(ms) and all(r == 2 for r in seen) and len(grads) == len(seen)  # + backward each
    # tune_inputs: 10 repeats and a saved ranking unless told otherwise
    monkeypatch.setattr(D, "gpu_name", lambda device: "Test GPU")
    monkeypatch.setenv("ELIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(D, "_DISK", None)
    monkeypatch.setattr(D, "_TUNED", {})
    reps = []
    monkeypatch.setattr(D, "time_backends", lambda i, repeats: reps.append(repeats) or {"torch": 1.0})
    gpu = _on_gpu(_inp(dtype=torch.bfloat16))
    res = D.tune_inputs(gpu)
    assert reps == [10] and json.loads(pathlib.Path(D.cache_path()).read_text()) == \
        {repr(D._class_key(res["class"])): ["torch"]}


def test_every_dispatch_change_starts_a_generation_never_seen_before(monkeypatch):
    """AttentionPlans keep a decision until dispatch.generation changes: clearing, tuning inputs, and entering
    or leaving tuning() must each give a value never used before (one seen again would revive stale decisions)."""
    monkeypatch.setattr(D, "time_backends", lambda inp, repeats: {"reference": 1.0})
    seen = [D.generation]
    try:
        for change in (D.clear_decisions, lambda: D.tune_inputs(_inp(), repeats=1, save=False), D.clear_decisions,
                       lambda: D.tune_inputs(_inp(), repeats=1, save=False)):
            change()
            seen.append(D.generation)
            with D.tuning(False):
                seen.append(D.generation)
            seen.append(D.generation)
    finally:
        D.clear_decisions()
    assert seen == sorted(set(seen)), seen  # strictly increasing: every value new


def _eligible(b, inp) -> bool:
    """Whether ``b`` takes ``inp`` by its per-call refusals, its device refusal left out (a CUDA backend's other
    refusals must still be keyed right on a CPU)."""
    return not [r for r in b.not_supported_reasons(inp) if not r.startswith("needs cuda")]


def test_the_decision_key_holds_every_field_a_backend_refuses_by():
    """A cached decision answers every call of its key: two calls with one key that some backend takes differently
    would run the second on a backend that refuses it (a zero softmax_scale, which FlashAttention-2 turns into NaN,
    once shared the key of a nonzero one: torch_varlen then ran it from the cache). Over a grid of the fields the
    backends read (lengths past FEW_RUNS runs, past triton_window's 128 keys, queries past keys + 1 under a
    window), calls with equal keys must get the same verdict from every registered backend, and the same
    known-answer kind."""
    import itertools

    from elit_kernels.attention import known_answer as KA

    lengths = [((3, 5), (5, 5)), ((2, 2), (9, 9)), ((1, 2, 3, 4, 5, 6), (2, 3, 4, 5, 6, 7)), ((3,), (129,)),
               ((9, 2), (3, 2))]
    made = {(dtype, d, lens): random_varlen_inputs(list(lens[0]), list(lens[1]), 2, d, dtype=dtype, seed=0)
            for dtype in (torch.float32, torch.float16) for d in (8, 136) for lens in lengths}  # 136: past 128
    seen: dict = {}
    grid = itertools.product((torch.float32, torch.float16), (None, 0.0, -0.5, 1e-50, 2.5e38), (False, True),
                             ((-1, -1), (2, -1), (2, 3)), (0.0, 5.0), (False, True), (1, 2), (False, True),
                             lengths, (False, True), (8, 136), (False, True))
    for dtype, scale, causal, window, softcap, lse, kv_heads, segs, (lq, lk), det, d, grad in grid:
        q, k, v, cq, ck, mq, mk = made[(dtype, d, (lq, lk))]
        k, v = k[:, :kv_heads], v[:, :kv_heads]
        if grad:
            q = q.detach().requires_grad_()
        seg = SegmentRuns.from_lengths(lq, lk) if segs else None
        inp = A.validate_inputs(q, k, v, cq, ck, mq, mk, scale, causal, return_lse=lse, window_size=window,
                                softcap=softcap, segments=seg, deterministic=det, derive_segments=False)
        kind = (inp.causal, inp.num_kv_heads != inp.num_heads, inp.has_window or inp.softcap != 0.0)
        verdict = tuple(_eligible(b, inp) for b in R.registered_backends()) + (
            KA._dtype_key(inp.q.device, inp.q.dtype), kind)
        key = D._decision_key(inp)
        call = dict(dtype=dtype, scale=scale, causal=causal, window=window, softcap=softcap, lse=lse,
                    kv_heads=kv_heads, segments=segs, lengths=(lq, lk), deterministic=det, head_dim=d, grad=grad)
        first = seen.setdefault(key, (verdict, call))
        assert first[0] == verdict, f"one decision key, different backends eligible: {first[1]} vs {call}"
    assert len(seen) > 100


def test_the_decision_key_follows_the_fp32_matmul_precision_of_the_known_answer_verdict(monkeypatch):
    """CUDA fp32 verdicts are kept per matmul precision (TF32 or IEEE): a decision cached under one must not answer
    a call under the other, whose kind was never checked (on a CPU the precision is not part of the verdict, so
    the verdict's dtype key is switched here as CUDA's is)."""
    from elit_kernels.attention import known_answer as KA

    inp = A.validate_inputs(*random_varlen_inputs([3, 5], [4, 6], 2, 8, seed=2))
    mode = ["ieee"]
    monkeypatch.setattr(KA, "_dtype_key", lambda device, dtype: f"float32/{mode[0]}")
    ieee = D._decision_key(inp)
    mode[0] = "tf32"
    assert D._decision_key(inp) != ieee


def test_a_zero_scale_is_not_answered_from_a_nonzero_scales_cached_decision(fakes):
    """End to end: a backend that refuses a zero scale (as FlashAttention-2 varlen does) and is picked for a call of
    scale 0.3 must not run the same call of scale 0 from the cache."""
    ran = []

    class NoZeroScale(R.Backend):
        name, priority = "no_zero_scale", 1000

        def not_supported_reasons(self, inp):
            return super().not_supported_reasons(inp) + (["softmax_scale 0"] if inp.softmax_scale == 0.0 else [])

        def forward(self, inp):
            ran.append(inp.softmax_scale)
            return D.get_backend("reference").forward(inp)

    R.register_backend(NoZeroScale())
    try:
        q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 5], [4, 6], 2, 8, seed=2)
        A.varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=0.3)
        out = A.varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=0.0)
        assert ran == [0.3]
        torch.testing.assert_close(out, A.varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=0.0,
                                                           backend="reference"))
    finally:
        R._REGISTRY.pop("no_zero_scale", None)
        D.clear_decisions()
