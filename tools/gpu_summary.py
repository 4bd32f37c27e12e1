"""Write ``$OUT/summary.json`` for tools/gpu_check.sh and print its key lines (standard library only, so it
runs whatever else failed).

Reads the stage table (``WORK/stages.tsv``), the junit XML of each test stage (or, for a stage killed before
pytest could write one, nothing: its count says so), ``ops.json`` (attention TFLOP/s per method),
``WORK/elementwise/elementwise.json`` (the elementwise ops' bandwidth per implementation) and
``model.json`` (elit-bench rows, targets and the per-stage breakdown) and the sampling run's results.
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


def not_run(collected_path: str, junit_path: str) -> list[str]:
    """Collected GPU tests with no result in the junit XML (the stage's time ran out, or pytest died)."""
    if not os.path.exists(collected_path):
        return []
    collected = [line.strip() for line in open(collected_path) if "::" in line]
    seen = set()
    if os.path.exists(junit_path):
        try:
            seen = {_node(c) for c in ET.parse(junit_path).getroot().iter("testcase")}
        except ET.ParseError:
            pass
    return [c for c in collected if c not in seen]


def test_counts(path: str) -> dict:
    """{backend: {passed, failed, skipped}} from a junit XML (an absent file: {"missing": true})."""
    if not os.path.exists(path):
        return {"missing": True}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"unreadable": str(e)}
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


def ops_summary(path: str) -> dict:
    """Best forward and forward+backward TFLOP/s per (shape, method) at each head dim, and each method's
    ratio to the best exact method of the row."""
    if not os.path.exists(path):
        return {}
    rows = json.load(open(path))["rows"]
    table = {}
    for r in rows:
        if r.get("tflops") is None:
            continue
        table.setdefault(f"{r['shape']} {r['pass']}", {})[r["method"]] = round(r["tflops"], 1)
    best = {}
    for key, methods in table.items():
        name, tf = max(methods.items(), key=lambda kv: kv[1])
        best[key] = {"best": name, "tflops": tf, **{
            f"elit:{b} / best": round(methods[f"elit:{b}"] / tf, 3) if f"elit:{b}" in methods else None
            for b in ("triton", "triton_window", "cuda")}}
    return {"tflops": table, "best": best}


def elementwise_summary(path: str) -> dict:
    """Per op: each implementation's ms, GB/s and % of the H200's bandwidth, and ``fused`` against the best of
    what PyTorch gives (``native`` eager, ``native+compile``): the measurement that decides whether the compiled
    elementwise kernels stay (benchmarks/bench_elementwise.py)."""
    if not os.path.exists(path):
        return {}
    rows = json.load(open(path))["rows"]
    out = {}
    for r in rows:
        if r.get("ms") is None:
            continue
        out.setdefault(r["op"], {})[r["impl"]] = {"ms": round(r["ms"], 4), "gbps": round(r["gbps"], 1),
                                                  "pct_peak_bw": r.get("pct_peak_bw") and round(r["pct_peak_bw"], 1)}
    for impls in out.values():
        torch_best = min((impls[k]["ms"] for k in ("native", "native+compile") if k in impls), default=None)
        impls["fused / best of native, native+compile"] = (
            round(impls["fused"]["ms"] / torch_best, 3) if "fused" in impls and torch_best else None)
    return out


def model_summary(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    data = json.load(open(path))
    rows, targets = data["rows"], data.get("targets", [])
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
                                       f"{r.get('images_per_s', 0):.2f} vs {off.get('images_per_s', 0):.2f}",
                               "preset": r["preset"], "backend": r["backend"],
                               "value": round(r["latency_ms"] / off["latency_ms"], 3)})
        if r["scenario"] == "uniform" and r["model"] == "elit" and r.get("latency_ms"):
            dense = next((x for x in rows if x["preset"] == r["preset"] and x["model"] == "official"
                          and x["scenario"] == "uniform" and x["budget"] == r["budget"] and x.get("latency_ms")), None)
            if dense:
                ratios.append({"what": f"ragged / dense J={r['budget']}", "preset": r["preset"],
                               "backend": r["backend"], "value": round(r["latency_ms"] / dense["latency_ms"], 3)})
    out["ratios"] = ratios
    # elit-bench --breakdown: per (preset, backend, budget) the device time per stage and kind of op
    out["breakdown"] = [{"preset": b["preset"], "backend": b["backend"], "budget": b["budget"],
                         "clock": b.get("clock"), "ms": round(b["total_ms"], 3), "wall_ms": round(b["wall_ms"], 3),
                         "stages": {k: round(v, 3) for k, v in b["stages"].items()},
                         "kinds": {k: round(v, 3) for k, v in b["kinds"].items()}}
                        for b in data.get("metadata", {}).get("breakdown") or []]
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--seconds", type=int, default=0)
    a = p.parse_args()
    stages = []
    tsv = os.path.join(a.work, "stages.tsv")
    if os.path.exists(tsv):
        for line in open(tsv):
            name, rc, secs = line.rstrip("\n").split("\t")
            stages.append({"stage": name, "rc": rc, "seconds": int(secs)})
    env = open(os.path.join(a.work, "env.txt")).read() if os.path.exists(os.path.join(a.work, "env.txt")) else ""
    junit = os.path.join(a.out, "junit_gpu.xml")
    tests = {"gpu": test_counts(junit)}
    missed = not_run(os.path.join(a.work, "collected.txt"), junit)
    stage_rc = {s["stage"]: s["rc"] for s in stages}
    why = {"124": "the stage's time limit was reached", "skipped:budget": "the budget was spent"}.get(
        stage_rc.get("tests: gpu", ""), f"the test stage ended with rc {stage_rc.get('tests: gpu', '?')}")
    tests["not_run"] = {"count": len(missed), "why": why if missed else None, "tests": missed[:50]}
    dispatch_md = os.path.join(a.out, "dispatch_report.md")
    dispatch_lines = [ln.rstrip() for ln in open(dispatch_md)] if os.path.exists(dispatch_md) else []
    failed_stages = [s["stage"] for s in stages if not (s["rc"] == "0" or s["rc"].startswith("skipped")
                                                         or s["rc"] == "5")]  # 5: pytest collected nothing
    summary = {"env": env.strip().splitlines(), "seconds": a.seconds, "stages": stages,
               "failed_stages": failed_stages, "tests": tests,
               "dispatch": {"rows": [ln for ln in dispatch_lines if ln.startswith("| ") and "---" not in ln][1:],
                            "overhead": next((ln for ln in dispatch_lines if ln.startswith("Per-call")), None)},
               "ops": ops_summary(os.path.join(a.out, "ops.json")),
               "elementwise": elementwise_summary(os.path.join(a.work, "elementwise", "elementwise.json")),
               "model": model_summary(os.path.join(a.out, "model.json")),
               "model_fp32": model_summary(os.path.join(a.work, "model_fp32", "results.json")),
               "sampling": model_summary(os.path.join(a.work, "sampling", "results.json"))}
    summary["ok"] = not failed_stages and not missed and all(
        not c.get("failures") for k, c in tests.items() if k != "not_run" and isinstance(c, dict))
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    # The last lines of the log: what a reader needs first.
    print("stages: " + ", ".join(f"{s['stage']}={s['rc']} ({s['seconds']}s)" for s in stages))
    for stage, c in tests.items():
        if stage == "not_run":
            continue
        counts = c.get("by_backend", c)
        print(f"tests [{stage} stage]: " + json.dumps(counts))
        for name in c.get("failures", [])[:8]:
            print(f"  FAILED {name}")
    print(f"tests not run: {len(missed)}" + (f" ({why}): " + ", ".join(missed[:5]) if missed else ""))
    for row in summary["dispatch"]["rows"][:40]:
        print("dispatch " + row[:200])
    if summary["dispatch"]["overhead"]:
        print(summary["dispatch"]["overhead"])
    for key, b in list(summary["ops"].get("best", {}).items())[:12]:
        print(f"ops {key}: best {b['best']} {b['tflops']} TFLOP/s; triton/best {b['elit:triton / best']}, "
              f"triton_window/best {b['elit:triton_window / best']}, cuda/best {b['elit:cuda / best']}")
    for op, impls in summary["elementwise"].items():
        print(f"elementwise {op}: " + "; ".join(
            f"{k} {v['ms']} ms {v['gbps']} GB/s" if isinstance(v, dict) else f"{k} {v}" for k, v in impls.items()))
    for key in ("model", "model_fp32", "sampling"):
        for r in summary[key].get("ratios", [])[:16]:
            print(f"{key} {r['preset']} {r['backend']}: {r['what']} = {r['value']}")
        for b in summary[key].get("breakdown", []):
            print(f"{key} breakdown {b['preset']} {b['backend']} J={b['budget']}: {b['clock']} time {b['ms']} ms of "
                  f"{b['wall_ms']} ms wall; stages {b['stages']}; kinds {b['kinds']}")
    print(f"summary: {'OK' if summary['ok'] else 'NOT OK'} in {a.seconds}s; wrote {a.out}/summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
