"""Write ``$OUT/summary.json`` for tools/gpu_check.sh and print its key lines (standard library only, so it
runs whatever else failed).

Reads the stage table (``WORK/stages.tsv``), the junit XML of each test stage (or, for a stage killed before
pytest could write one, nothing: its count says so), ``ops.json`` (attention TFLOP/s per method),
``WORK/elementwise/elementwise.json`` (the elementwise ops' bandwidth per implementation) and
``model.json`` (elit-bench rows, targets and the per-stage breakdown) and the sampling run's results.

Each input is read on its own (``_guarded``): one that cannot be read (truncated, not the expected shape, a folder
in its place) is "could not read PATH: reason" in ``problems`` and the rest is still summarised, so that
summary.json always holds what was readable. ``ok`` is true only when the GPU tests' results were read and none
failed, no collected test went unrun, no stage failed, every input present could be read and the script's own
exit status (``--exit-code``) is 0; ``why_not_ok`` gives the reasons, also on the last line printed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import xml.etree.ElementTree as ET

BACKEND_OF_FILE = {"test_cext": "cuda", "test_dropin": "cuda", "test_compiled_checks": "cuda",
                   "test_triton_attention": "triton", "test_gpu_model": "model"}


def _backend(case) -> str:
    name, cls = case.get("name", ""), case.get("classname", "")
    m = re.search(r"known_answer_on_gpu\[(\w+)-", name)
    if m:
        return m.group(1)
    for f, b in BACKEND_OF_FILE.items():
        if f in cls:
            return b
    return "other"


def _node(case) -> str:
    """``tests/file.py::name`` of a junit testcase (classname is dotted: tests.test_file)."""
    cls = case.get("classname", "")
    return f"{cls.replace('.', '/')}.py::{case.get('name', '')}"


def _text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _rows(data, path: str) -> list[dict]:
    """``data["rows"]``, checked to be a list of objects (ValueError naming what it is instead)."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"expected a JSON object with a 'rows' list, got {type(data).__name__}"
                         + (f" with 'rows' {type(data.get('rows')).__name__}" if isinstance(data, dict) else ""))
    bad = [type(r).__name__ for r in data["rows"] if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"{len(bad)} of its rows are not objects (e.g. {bad[0]})")
    return data["rows"]


def _round(x, nd: int):
    """``round(x, nd)`` for a number; None for anything else (a null in a row)."""
    return round(x, nd) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _junit_root(path: str):
    root = ET.parse(path).getroot()
    if root.tag not in ("testsuites", "testsuite"):
        raise ValueError(f"not a junit XML file (its root element is <{root.tag}>, not <testsuites>/<testsuite>)")
    return root


def not_run(collected_path: str, junit_path: str) -> list[str]:
    """Collected GPU tests with no result in the junit XML (the stage's time ran out, or pytest died)."""
    if not os.path.exists(collected_path):
        return []
    collected = [line.strip() for line in _text(collected_path).splitlines() if "::" in line]
    seen = set()
    if os.path.exists(junit_path):
        try:
            seen = {_node(c) for c in _junit_root(junit_path).iter("testcase")}
        except (ET.ParseError, OSError, ValueError):
            pass  # test_counts says so
    return [c for c in collected if c not in seen]


def test_counts(path: str) -> dict:
    """{backend: {passed, failed, skipped}} from a junit XML (an absent file: {"missing": true}; one that cannot
    be read or is not junit: {"unreadable": "could not read PATH: reason"})."""
    if not os.path.exists(path):
        return {"missing": True}
    try:
        root = _junit_root(path)
    except (ET.ParseError, OSError, ValueError) as e:
        return {"unreadable": f"could not read {path}: {type(e).__name__}: {e}"}
    out, failures = {}, []
    for case in root.iter("testcase"):
        b = _backend(case)
        c = out.setdefault(b, {"passed": 0, "failed": 0, "skipped": 0})
        if case.find("failure") is not None or case.find("error") is not None:
            c["failed"] += 1
            failures.append(f"{case.get('classname', '')}::{case.get('name', '')}")
        elif case.find("skipped") is not None:
            c["skipped"] += 1
        else:
            c["passed"] += 1
    return {"by_backend": out, "failures": failures[:30]}


def _peaks(data) -> dict | None:
    """The ceilings a bench measured in its run (``metadata.peaks``, ``bench.timing.measure_peaks``), or None: a
    file written before the benches measured them (its percentages were taken against fixed H200 figures)."""
    md = data.get("metadata") if isinstance(data, dict) else None
    peaks = md.get("peaks") if isinstance(md, dict) else None
    return peaks if isinstance(peaks, dict) else None


def ops_summary(path: str) -> dict:
    """Best forward and forward+backward TFLOP/s per (shape, method) at each head dim, and each method's
    ratio to the best exact method of the row; the roofline: each forward's percentage of the card's copy rate
    (``pct_peak_bw``) and the ceilings the bench measured in the same run (``peaks``; None when not recorded)."""
    if not os.path.exists(path):
        return {}
    data = _json(path)
    rows = _rows(data, path)
    peaks = _peaks(data)
    peaks = {k: _round(peaks.get(k), 1) for k in ("tflops", "gbps", "matmul_n", "copy_mb")} \
        if peaks is not None else None
    measured = peaks is not None  # percentages only from a run that measured its own ceilings
    table, bw, exact = {}, {}, {}
    for r in rows:
        if _round(r.get("tflops"), 1) is None:
            continue
        table.setdefault(f"{r['shape']} {r['pass']}", {})[str(r["method"])] = round(r["tflops"], 1)
        if r.get("exact", True) is not False:  # a padded comparator without a mask computes other numbers
            exact.setdefault(f"{r['shape']} {r['pass']}", {})[str(r["method"])] = round(r["tflops"], 1)
        if measured and _round(r.get("pct_peak_bw"), 1) is not None:
            bw.setdefault(f"{r['shape']} {r['pass']}", {})[str(r["method"])] = round(r["pct_peak_bw"], 1)
    best = {}
    for key, methods in exact.items():
        name, tf = max(methods.items(), key=lambda kv: kv[1])
        best[key] = {"best": name, "tflops": tf, **{  # a best of 0.0 (a CPU run's rounding): no ratio
            f"elit:{b} / best": round(methods[f"elit:{b}"] / tf, 3) if (f"elit:{b}" in methods and tf) else None
            for b in ("default", "default(no segments)", "default(drop-in)", "triton", "triton_window", "cuda")}}
    return {"tflops": table, "best": best, "pct_peak_bw": bw, "peaks": peaks}


def elementwise_summary(path: str) -> dict:
    """Per op: each implementation's ms, GB/s and % of the copy rate the bench measured on the card, and
    ``fused`` against the best of what PyTorch gives (``native`` eager, ``native+compile``): the measurement that
    decides whether the compiled elementwise kernels stay (benchmarks/bench_elementwise.py)."""
    if not os.path.exists(path):
        return {}
    data = _json(path)
    rows = _rows(data, path)
    measured = _peaks(data) is not None
    out = {}
    for r in rows:
        if _round(r.get("ms"), 4) is None:
            continue
        out.setdefault(str(r["op"]), {})[str(r["impl"])] = {"ms": round(r["ms"], 4), "gbps": _round(r.get("gbps"), 1),
                                                            "pct_peak_bw": _round(r.get("pct_peak_bw"), 1) if measured
                                                            else None}
    for impls in out.values():
        torch_best = min((impls[k]["ms"] for k in ("native", "native+compile") if k in impls), default=None)
        impls["fused / best of native, native+compile"] = (
            round(impls["fused"]["ms"] / torch_best, 3) if "fused" in impls and torch_best else None)
    return out


class _Row(dict):
    """A result row whose missing keys read as None (a ratio needs them all; a row without one gives none)."""

    def __missing__(self, key):
        return None


def model_summary(path: str) -> dict:
    """elit-bench's results: its targets, the key ratios (a row without the keys a ratio needs gives none), the
    fraction of the card's matmul rate each uniform forward reaches, and the per-stage breakdown."""
    if not os.path.exists(path):
        return {}
    data = _json(path)
    rows = [_Row(r) for r in _rows(data, path)]
    targets = data.get("targets") or []
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        raise ValueError("'targets' is not a list of objects")
    out = {"targets": [{k: t[k] for k in ("target", "clock", "preset", "backend", "budget", "value", "holds")
                        if k in t} for t in targets]}
    ratios = []
    for r in rows:
        if r["scenario"] == "guidance" and r["model"] == "elit" and r["case"] == "ccfg" and r.get("latency_ms"):
            two = next((x for x in rows if x["preset"] == r["preset"] and x["backend"] == r["backend"]
                        and x["case"] == "ccfg_two_pass" and x["model"] == "elit" and x.get("latency_ms")), None)
            if two:
                ratios.append({"what": "one-pass / two-pass CCFG", "preset": r["preset"], "backend": r["backend"],
                               "value": round(r["latency_ms"] / two["latency_ms"], 3)})
        if r["scenario"] == "mixed" and r["model"] == "elit" and r["case"] == "ragged" and r.get("latency_ms"):
            parts = next((x for x in rows if x["preset"] == r["preset"] and x["model"] == "official"
                          and x["scenario"] == "mixed" and x["case"] == "sum_of_parts" and x.get("latency_ms")), None)
            if parts:
                ratios.append({"what": "mixed ragged / dense sum of parts", "preset": r["preset"],
                               "backend": r["backend"], "value": round(r["latency_ms"] / parts["latency_ms"], 3)})
        if r["scenario"] == "sampling" and r["model"] == "elit" and r.get("latency_ms"):
            off = next((x for x in rows if x["preset"] == r["preset"] and x["model"] == "official"
                        and x["scenario"] == "sampling" and x.get("latency_ms")), None)
            if off:
                ratios.append({"what": f"sampling run ({r.get('steps')} CCFG steps) / official sampler, images/s "
                                       f"{r.get('images_per_s') or 0:.2f} vs {off.get('images_per_s') or 0:.2f}",
                               "preset": r["preset"], "backend": r["backend"],
                               "value": round(r["latency_ms"] / off["latency_ms"], 3)})
        if r["scenario"] == "uniform" and r["model"] == "elit" and r.get("latency_ms"):
            dense = next((x for x in rows if x["preset"] == r["preset"] and x["model"] == "official"
                          and x["scenario"] == "uniform" and x["budget"] == r["budget"] and x.get("latency_ms")), None)
            if dense:
                ratios.append({"what": f"ragged / dense J={r['budget']}", "preset": r["preset"],
                               "backend": r["backend"], "value": round(r["latency_ms"] / dense["latency_ms"], 3)})
    out["ratios"] = ratios
    # the fraction of the card's matmul rate each uniform forward reaches (elit-bench's pct_peak_flops; None on
    # results without a measured peak)
    pk = _peaks(data)
    out["peak_tflops"] = {"tflops": _round(pk.get("tflops"), 1), "dtype": str(pk.get("dtype"))} \
        if pk is not None else None
    out["pct_peak_flops"] = [{"preset": r["preset"], "model": r["model"], "backend": r["backend"],
                              "budget": r["budget"], "tflops": _round(r.get("tflops"), 1),
                              "pct": _round(r.get("pct_peak_flops"), 1)}
                             for r in rows if r["scenario"] == "uniform" and _round(r.get("pct_peak_flops"), 1) is not None]
    # elit-bench --breakdown: per (preset, backend, budget) the device time per stage and kind of op
    meta = data.get("metadata") or {}
    breakdown = (meta.get("breakdown") if isinstance(meta, dict) else None) or []
    out["breakdown"] = [{"preset": b["preset"], "backend": b["backend"], "budget": b["budget"],
                         "clock": b.get("clock"), "ms": _round(b["total_ms"], 3), "wall_ms": _round(b["wall_ms"], 3),
                         "stages": {k: _round(v, 3) for k, v in b["stages"].items()},
                         "kinds": {k: _round(v, 3) for k, v in b["kinds"].items()}}
                        for b in breakdown]
    return out


def read_stages(path: str, problems: list[str]) -> list[dict]:
    """The stage table (``name<TAB>rc<TAB>seconds`` per line); a line that is not that is a problem, the others
    are kept (a bad seconds field: the stage with ``seconds`` None)."""
    stages = []
    for i, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            problems.append(f"could not read {path}: line {i} {line[:120]!r} has {len(fields)} tab-separated "
                            "fields (expected stage, rc, seconds)")
            continue
        name, rc, secs = fields
        try:
            seconds = int(secs)
        except ValueError:
            problems.append(f"could not read {path}: line {i}: seconds {secs[:40]!r} is not an integer")
            seconds = None
        stages.append({"stage": name, "rc": rc, "seconds": seconds})
    return stages


def _guarded(problems: list[str], path: str, read, default):
    """``read()``; when it raises, "could not read PATH: reason" goes to ``problems`` and the result is
    ``default`` (so one bad input never loses the summary of the others)."""
    try:
        return read()
    # whatever is wrong with one file (BLE001: any exception), the others are still summarised
    except Exception as e:  # noqa: BLE001
        why = f"could not read {path}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        problems.append(why)
        return default(why) if callable(default) else default


def _unreadable(why: str) -> dict:
    return {"unreadable": why}


def _atomic_write(path: str, write) -> None:
    """``elit_kernels._files.atomic_write``, loaded from its file: it imports nothing, and the package (torch with
    it) is not imported here, so the summary is written whatever state the build is in."""
    import importlib.util

    where = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "elit_kernels", "_files.py")
    spec = importlib.util.spec_from_file_location("_elit_files", where)
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    files.atomic_write(path, write)


def write_summary(path: str, summary: dict) -> None:
    """summary.json whole or not at all (``_atomic_write``); its folder is created when missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    _atomic_write(path, dump)


def summarize(out: str, work: str, exit_code: int, seconds: int) -> dict:
    """summary.json's content: every input read by its own guarded reader (``problems`` lists the ones that could
    not be read), and ``ok`` with ``why_not_ok``."""
    problems: list[str] = []
    tsv = os.path.join(work, "stages.tsv")
    stages = _guarded(problems, tsv, lambda: read_stages(tsv, problems), []) if os.path.exists(tsv) else []
    env_path = os.path.join(work, "env.txt")
    env = _guarded(problems, env_path, lambda: _text(env_path), "") if os.path.exists(env_path) else ""
    junit = os.path.join(out, "junit_gpu.xml")
    tests = {"gpu": _guarded(problems, junit, lambda: test_counts(junit), _unreadable)}
    if tests["gpu"].get("unreadable") and tests["gpu"]["unreadable"] not in problems:
        problems.append(tests["gpu"]["unreadable"])
    collected = os.path.join(work, "collected.txt")
    missed = _guarded(problems, collected, lambda: not_run(collected, junit), [])
    stage_rc = {s["stage"]: s["rc"] for s in stages}
    why = {"124": "the stage's time limit was reached", "skipped:budget": "the budget was spent"}.get(
        stage_rc.get("tests: gpu", ""), f"the test stage ended with rc {stage_rc.get('tests: gpu', '?')}")
    tests["not_run"] = {"count": len(missed), "why": why if missed else None, "tests": missed[:50]}
    dispatch_md = os.path.join(out, "dispatch_report.md")
    dispatch_lines = (_guarded(problems, dispatch_md, lambda: [ln.rstrip() for ln in _text(dispatch_md).splitlines()],
                               []) if os.path.exists(dispatch_md) else [])
    failed_stages = [s["stage"] for s in stages if not (s["rc"] == "0" or s["rc"].startswith("skipped")
                                                         or s["rc"] == "5")]  # 5: pytest collected nothing
    sections = {"ops": (ops_summary, os.path.join(out, "ops.json")),
                "elementwise": (elementwise_summary, os.path.join(work, "elementwise", "elementwise.json")),
                "model": (model_summary, os.path.join(out, "model.json")),
                "model_fp32": (model_summary, os.path.join(work, "model_fp32", "results.json")),
                "sampling": (model_summary, os.path.join(work, "sampling", "results.json"))}
    summary = {"env": env.strip().splitlines(), "seconds": seconds, "exit_code": exit_code, "stages": stages,
               "failed_stages": failed_stages, "tests": tests,
               "dispatch": {"rows": [ln for ln in dispatch_lines if ln.startswith("| ") and "---" not in ln][1:],
                            "overhead": next((ln for ln in dispatch_lines if ln.startswith("Per-call")), None)}}
    for key, (read, path) in sections.items():
        summary[key] = _guarded(problems, path, lambda read=read, path=path: read(path), _unreadable)
    gpu = tests["gpu"]
    why_not_ok = []
    if exit_code != 0:
        why_not_ok.append(f"tools/gpu_check.sh ended with exit status {exit_code}")
    if gpu.get("missing"):
        why_not_ok.append(f"no test results: {junit} does not exist")
    elif gpu.get("unreadable"):
        why_not_ok.append(f"no test results: {gpu['unreadable']}")
    elif gpu.get("failures") or any(c.get("failed") for c in gpu.get("by_backend", {}).values()):
        n = sum(c.get("failed", 0) for c in gpu.get("by_backend", {}).values())
        why_not_ok.append(f"{n} GPU test(s) failed")
    if failed_stages:
        why_not_ok.append(f"failed stages: {', '.join(failed_stages)}")
    if missed:
        why_not_ok.append(f"{len(missed)} collected test(s) not run ({why})")
    why_not_ok += [p for p in problems if p not in why_not_ok and not p.startswith(f"could not read {junit}:")]
    summary["problems"] = problems
    summary["why_not_ok"] = why_not_ok
    summary["ok"] = not why_not_ok
    return summary


def _print_lines(summary: dict) -> None:
    """The key lines of the log (what a reader needs first)."""
    stages, tests, missed = summary["stages"], summary["tests"], summary["tests"]["not_run"]
    print("stages: " + ", ".join(f"{s['stage']}={s['rc']} ({s['seconds']}s)" for s in stages))
    for stage, c in tests.items():
        if stage == "not_run":
            continue
        counts = c.get("by_backend", c)
        print(f"tests [{stage} stage]: " + json.dumps(counts))
        for name in c.get("failures", [])[:8]:
            print(f"  FAILED {name}")
    print(f"tests not run: {missed['count']}" + (f" ({missed['why']}): " + ", ".join(missed["tests"][:5])
                                                 if missed["count"] else ""))
    for row in summary["dispatch"]["rows"][:40]:
        print("dispatch " + row[:200])
    if summary["dispatch"]["overhead"]:
        print(summary["dispatch"]["overhead"])
    if summary["ops"].get("peaks"):
        pk = summary["ops"]["peaks"]
        print(f"ops ceilings measured on the card: {pk['tflops']} TFLOP/s matmul (n {pk['matmul_n']}), {pk['gbps']} "
              f"GB/s copy ({pk['copy_mb']} MB)")
    bw = summary["ops"].get("pct_peak_bw", {})
    for key, b in list(summary["ops"].get("best", {}).items())[:12]:
        pct = bw.get(key, {})
        print(f"ops {key}: best {b['best']} {b['tflops']} TFLOP/s; default/best {b['elit:default / best']}, "
              f"drop-in/best {b['elit:default(drop-in) / best']}; triton/best {b['elit:triton / best']}, "
              f"triton_window/best {b['elit:triton_window / best']}, cuda/best {b['elit:cuda / best']}"
              + (f"; % of copy rate: best {pct.get(b['best'])}, triton_window {pct.get('elit:triton_window')}"
                 if pct else ""))
    for op, impls in summary["elementwise"].items():
        if op == "unreadable":
            continue
        print(f"elementwise {op}: " + "; ".join(
            (f"{k} {v['ms']} ms {v['gbps']} GB/s" + (f" ({v['pct_peak_bw']} % of copy)" if v["pct_peak_bw"] is not None
                                                      else "")) if isinstance(v, dict) else f"{k} {v}"
            for k, v in impls.items()))
    for key in ("model", "model_fp32", "sampling"):
        for r in summary[key].get("ratios", [])[:16]:
            print(f"{key} {r['preset']} {r['backend']}: {r['what']} = {r['value']}")
        for f in summary[key].get("pct_peak_flops", [])[:12]:
            pk = summary[key].get("peak_tflops") or {}
            print(f"{key} {f['preset']} {f['model']} {f['backend']} J={f['budget']}: {f['tflops']} TFLOP/s, "
                  f"{f['pct']} % of the card's {pk.get('dtype')} matmul rate ({pk.get('tflops')} TFLOP/s)")
        for b in summary[key].get("breakdown", []):
            print(f"{key} breakdown {b['preset']} {b['backend']} J={b['budget']}: {b['clock']} time {b['ms']} ms of "
                  f"{b['wall_ms']} ms wall; stages {b['stages']}; kinds {b['kinds']}")
    for problem in summary["problems"]:
        print(problem)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--seconds", type=int, default=0)
    a = p.parse_args(argv)
    summary = summarize(a.out, a.work, a.exit_code, a.seconds)
    path = os.path.join(a.out, "summary.json")
    try:
        write_summary(path, summary)
        wrote = f"wrote {path}"
    except OSError as e:
        wrote = f"could not write {path}: {e.strerror or e}"
    try:
        _print_lines(summary)
    # summary.json is written; the verdict line below must still come (BLE001: any exception)
    except Exception as e:  # noqa: BLE001
        print(f"could not print the summary's lines: {type(e).__name__}: {e}")
    verdict = "OK" if summary["ok"] else "NOT OK (" + "; ".join(summary["why_not_ok"]) + ")"
    print(f"summary: {verdict} in {a.seconds}s; {wrote}")
    return 0 if wrote.startswith("wrote") else 1


if __name__ == "__main__":
    raise SystemExit(main())
