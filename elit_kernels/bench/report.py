"""Rows, the stdout table, the target checks and the output files (results.json / .csv / .png)."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import subprocess

import torch

from .timing import Case, summarize

# The targets of check_targets, each a ratio of one run that should be <= its limit.
LATENCY_TARGET = 1.10  # latency(J̃)/latency(J_max) <= 1.10 × FLOPs(J̃)/FLOPs(J_max)
DENSE_TARGET = 1.00  # ragged path / dense path (same weights, same budget)
MIXED_TARGET = 0.95  # one ragged forward of a mixed batch <= 0.95 × the dense path's one forward per budget
CCFG_TARGET = 0.90  # one-pass CCFG <= 0.90 × two-pass CCFG (same model and backend)
SAMPLING_TARGET = 0.50  # a CCFG sampling run <= 0.50 × the official sampler's time (>= 2× its images/s)

# What each target is, and the devices it is a goal on. On any other device its verdict is printed but a FAIL
# is expected: informational, with the reason. Keyed by the start of check_targets' "target" text.
TARGET_INFO = {
    "latency_ratio": dict(
        name="latency follows FLOPs",
        what=f"uniform budgets: latency(J̃)/latency(J_max) <= {LATENCY_TARGET:.2f} × FLOPs(J̃)/FLOPs(J_max) of the same "
             "model and backend (a smaller budget is as much faster as it is cheaper)",
        devices=("cpu", "cuda"), why_not=""),
    "ragged / dense": dict(
        name="ragged vs dense",
        what=f"at every budget, our ragged model <= {DENSE_TARGET:.2f} × the same weights run the official way "
             "(official/sdpa_dense: dense SDPA over windows, one budget per batch)",
        devices=("cuda",),
        why_not="on a CPU both paths run the same matmuls and SDPA calls, so they tie within the run's noise; the "
                "ragged kernels' gain is owed on a GPU"),
    "mixed ragged": dict(
        name="mixed batch",
        what=f"one ragged forward of a mixed-budget batch <= {MIXED_TARGET:.2f} × the dense path's one forward per "
             "distinct budget (all a one-budget-per-batch implementation can do)",
        devices=("cpu", "cuda"), why_not=""),
    "one-pass CCFG": dict(
        name="one-pass CCFG",
        what=f"CCFG's conditional and weak halves as one ragged batch <= {CCFG_TARGET:.2f} × the same model running "
             "them as two forwards",
        devices=("cuda",),
        why_not="the same FLOPs in a 2x batch: on a CPU one pass saves only per-call overhead and loses cache "
                "locality; its gain (fewer launches, a fuller device) is owed on a GPU"),
    "sampling CCFG": dict(
        name="sampling run",
        what=f"a whole CCFG sampling run (same steps, budgets and batch) <= {SAMPLING_TARGET:.2f} × the official "
             "sampler's time, i.e. >= 2x its images/s (official/sdpa_dense: two dense passes per step)",
        devices=("cuda",),
        why_not="on a CPU the ragged pass and the two dense passes run the same matmuls; the gain (one ragged pass, "
                "CUDA graphs, no launch overhead) is owed on a GPU"),
}
_DEVICE_WORD = {"cpu": "CPU", "cuda": "GPU"}


def target_info(target: str) -> dict:
    """TARGET_INFO of a check_targets ``target`` text ("ragged / dense <= 1.00" -> the "ragged / dense" entry)."""
    return TARGET_INFO[target.split(" <=")[0]]


def meant_for(target: str) -> str:
    """The devices ``target`` is a goal on, in words: "CPU and GPU" or "GPU"."""
    return " and ".join(_DEVICE_WORD[d] for d in target_info(target)["devices"])

ROW_FIELDS = ["preset", "scenario", "case", "model", "backend", "budget", "budgets", "weak_budget", "batch", "latents",
              "latency_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "cpu_ms", "cpu_q1_ms", "cpu_q3_ms", "repeats", "gflops", "attention_gflops",
              "latency_ratio", "flops_ratio", "latency_over_flops", "cpu_ratio", "cpu_over_flops", "peak_mem_mb", "warmup_s",
              "steps", "images_per_s", "steps_per_s", "note", "tflops", "pct_peak_flops"]


OUTPUT_FILES = ("results.json", "results.csv", "summary.md", "latency_vs_latents.png")  # what --out DIR gets


def _compact(budgets: list[int]) -> str:
    """Per-sample budgets, runs of 3 or more equal ones as ``JxN``: ``[16]*4 + [1]*4`` -> ``16x4,1x4``;
    ``[1, 2, 2, 8]`` -> ``1,2,2,8``; one budget for all -> ``4x4``."""
    runs: list[list[int]] = []
    for j in budgets:
        if runs and runs[-1][0] == j:
            runs[-1][1] += 1
        else:
            runs.append([j, 1])
    if len(runs) == 1:
        return f"{runs[0][0]}x{runs[0][1]}"
    return ",".join(f"{j}x{n}" if n >= 3 else ",".join([str(j)] * n) for j, n in runs)


def _tflops(gflops, latency_ms) -> float | None:
    """GFLOPs over the median latency in ms (GFLOP/ms = TFLOP/s); None where either is missing."""
    return gflops / latency_ms if gflops is not None and latency_ms else None


def _pct_of_peak(tflops, peak_tflops) -> float | None:
    """``tflops`` as a percentage of the device's measured matmul rate; None where either is missing."""
    return 100 * tflops / peak_tflops if tflops and peak_tflops else None


def make_rows(cases: list[Case], device: torch.device, peaks: dict | None = None) -> list[dict]:
    """One result row per case (``ROW_FIELDS``). ``tflops``: the case's FLOPs over its median latency (GFLOP/ms =
    TFLOP/s); ``pct_peak_flops``: that against ``peaks["tflops"]`` (``timing.measure_peaks``: the device's matmul
    rate in the model's dtype, measured in the same run), the fraction of the machine the forward reaches."""
    by_key = {c.key: c for c in cases}
    rows = []
    for c in cases:
        st = summarize(c.times_ms)
        ct = summarize(c.cpu_times_ms)
        row = {"preset": c.preset, "scenario": c.scenario, "case": c.case, "model": c.model, "backend": c.backend, "budget": c.budget,
               "budgets": _compact(c.budgets), "weak_budget": c.weak_budget, "batch": c.batch,
               "latents": round(c.latents, 3), **st, "cpu_ms": ct["latency_ms"], "cpu_q1_ms": ct["q1_ms"],
               "cpu_q3_ms": ct["q3_ms"], "repeats": len(c.times_ms),
               "gflops": c.flops["total"] / 1e9 if c.flops else None,
               "attention_gflops": c.flops["attention"] / 1e9 if c.flops else None,
               "tflops": None, "pct_peak_flops": None, "latency_ratio": None, "flops_ratio": None, "latency_over_flops": None, "cpu_ratio": None,
               "cpu_over_flops": None,
               "peak_mem_mb": c.peak_mem_mb, "warmup_s": c.warm_s, "steps": c.steps,
               "images_per_s": (c.batch / (st["latency_ms"] / 1e3)) if c.steps and st["latency_ms"] else None,
               "steps_per_s": (c.steps / (st["latency_ms"] / 1e3)) if c.steps and st["latency_ms"] else None,
               "note": c.note}
        row["tflops"] = _tflops(row["gflops"], st["latency_ms"])
        row["pct_peak_flops"] = _pct_of_peak(row["tflops"], (peaks or {}).get("tflops"))
        ref = by_key.get(c.ref) if c.ref else None
        if ref is not None and ref.times_ms and st["latency_ms"]:
            row["latency_ratio"] = st["latency_ms"] / summarize(ref.times_ms)["latency_ms"]
            if c.flops and ref.flops and ref.flops["total"]:
                row["flops_ratio"] = c.flops["total"] / ref.flops["total"]
                row["latency_over_flops"] = row["latency_ratio"] / row["flops_ratio"] if row["flops_ratio"] else None
            if ct["latency_ms"] and ref.cpu_times_ms:
                row["cpu_ratio"] = ct["latency_ms"] / summarize(ref.cpu_times_ms)["latency_ms"]
                if row["flops_ratio"]:
                    row["cpu_over_flops"] = row["cpu_ratio"] / row["flops_ratio"]
        rows.append(row)
    return rows


def _by_key(rows: list[dict]) -> dict:
    """Rows by (preset, scenario, case, model, backend, budget): how targets and findings pair rows."""
    return {(r["preset"], r["scenario"], r["case"], r["model"], r["backend"], r["budget"]): r for r in rows}


def check_targets(rows: list[dict], device_type: str | None = None) -> list[dict]:
    """The project's speed targets, one entry per checked row and clock (the ELIT varlen path against the dense path).

    Each entry: ``target`` (the inequality), ``clock``, ``preset``, ``backend``, ``budget``, ``value``, ``holds``,
    ``meant_for`` ("CPU and GPU" or "GPU") and ``informational``: True when the run's ``device_type`` ("cpu" or
    "cuda") is not one the target is meant for, so that a FAIL there is expected (TARGET_INFO says why).

    - ``latency_ratio <= 1.10 x flops_ratio``: uniform budgets below J_max's FLOPs, latency(J̃)/latency(J_max)
      of one model and backend at most 1.10 × its FLOPs(J̃)/FLOPs(J_max) (latency falls as fast as the work);
    - ``ragged / dense <= 1.00``: at every timed budget, our model against the same weights run the official
      way (``official``/``sdpa_dense``, one dense SDPA per attention);
    - ``mixed ragged <= 0.95 x dense sum of parts``: one ragged forward of the mixed batch against the dense
      path's one forward per distinct budget (all a one-budget implementation can do);
    - ``one-pass CCFG <= 0.90 x two-pass CCFG``: the conditional and weak halves as one ragged batch against
      the same model and backend running them as two forwards;
    - ``sampling CCFG <= 0.50 x official sampler``: a whole CCFG sampling run (the ``sampling`` scenario) against
      the same steps run the official way (two dense passes per step).

    ``clock`` "wall" uses latency_ms; "cpu" (CPU runs only) uses the process CPU time, which on a
    shared machine is the compute without the time spent waiting for a core.
    """
    out = []

    def add(target, clock, r, budget, value, limit):
        info = target_info(target)
        out.append({"target": target, "clock": clock, "preset": r["preset"], "backend": r["backend"], "budget": budget,
                    "value": value, "limit": limit, "holds": value <= limit, "meant_for": meant_for(target),
                    "informational": device_type is not None and device_type not in info["devices"]})

    by = _by_key(rows)
    for clock, ratio_key, ms_key in (("wall", "latency_over_flops", "latency_ms"), ("cpu", "cpu_over_flops", "cpu_ms")):
        for r in rows:
            if r["model"] != "elit" or not r[ms_key]:
                continue
            key = (r["preset"], r["scenario"], r["case"])
            # not for a row with J_max's FLOPs: it is its own reference (1.00 by construction, a check that cannot fail)
            if r["scenario"] == "uniform" and r[ratio_key] is not None and r.get("flops_ratio") != 1.0:
                add(f"latency_ratio <= {LATENCY_TARGET:.2f} x flops_ratio", clock, r, r["budget"], r[ratio_key],
                    LATENCY_TARGET)
            if r["scenario"] == "uniform":
                dense = by.get((*key, "official", "sdpa_dense", r["budget"]))
                if dense and dense[ms_key]:
                    add(f"ragged / dense <= {DENSE_TARGET:.2f}", clock, r, r["budget"], r[ms_key] / dense[ms_key],
                        DENSE_TARGET)
            if key[1:] == ("mixed", "ragged"):
                parts = by.get((r["preset"], "mixed", "sum_of_parts", "official", "sdpa_dense", r["budget"]))
                if parts and parts[ms_key]:
                    add(f"mixed ragged <= {MIXED_TARGET:.2f} x dense sum of parts", clock, r, r["budgets"],
                        r[ms_key] / parts[ms_key], MIXED_TARGET)
            if key[1:] == ("sampling", "ccfg"):
                off = by.get((r["preset"], "sampling", "ccfg_two_pass", "official", "sdpa_dense", r["budget"]))
                if off and off[ms_key]:
                    add(f"sampling CCFG <= {SAMPLING_TARGET:.2f} x official sampler", clock, r, r["budgets"],
                        r[ms_key] / off[ms_key], SAMPLING_TARGET)
            if key[1:] == ("guidance", "ccfg"):
                two = by.get((r["preset"], "guidance", "ccfg_two_pass", "elit", r["backend"], r["budget"]))
                if two and two[ms_key]:
                    add(f"one-pass CCFG <= {CCFG_TARGET:.2f} x two-pass CCFG", clock, r, r["budgets"],
                        r[ms_key] / two[ms_key], CCFG_TARGET)
    return out


def value_text(t: dict) -> str:
    """A target's value to 3 decimals, or to as many more (up to 7) as it takes for the printed number to give the
    same verdict against the limit as the value itself (1.10036 against 1.10 prints 1.1004, not 1.100)."""
    for nd in range(3, 8):
        text = f"{t['value']:.{nd}f}"
        if "limit" not in t or (float(text) <= t["limit"]) == t["holds"]:
            return text
    return repr(t["value"])


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def format_table(rows: list[dict], targets: list[dict], device_label: str) -> str:
    """The stdout table; every column as wide as its widest cell (nothing is cut)."""
    cols = ["preset", "scenario", "case", "model", "backend", "budgets", "latents", "latency_ms", "q1_ms", "q3_ms",
            "cpu_ms", "gflops", "latency_ratio", "cpu_ratio", "flops_ratio", "peak_mem_mb"]
    heads = {"latency_ms": "median_ms", "latency_ratio": "lat/full", "flops_ratio": "flop/full", "peak_mem_mb": "peak_MiB",
             "cpu_ms": "cpu_ms", "cpu_ratio": "cpu/full"}
    cells = []
    for r in rows:
        vals = []
        for c in cols:
            v = r[c]
            if c == "latents" and isinstance(v, float):
                v = f"{v:g}"
            vals.append(_fmt(v, 3 if c.endswith("ratio") else 2))
        cells.append(vals)
    widths = [max([len(heads.get(c, c))] + [len(v[i]) for v in cells]) for i, c in enumerate(cols)]
    lines = [f"ELIT model latency vs budget — {device_label}"]
    lines.append("  ".join(heads.get(c, c).rjust(w) for c, w in zip(cols, widths)))
    for vals in cells:
        lines.append("  ".join(v.rjust(w) for v, w in zip(vals, widths)))
    if targets:
        lines.append("")
        lines += targets_text(targets, device_label.split(" ")[0])
    return "\n".join(lines)


def targets_legend(targets: list[dict], device_word: str) -> list[str]:
    """One line per target that was checked: what it is, where it is a goal, and whether a FAIL on this device
    is expected (and why)."""
    out = []
    for key, info in TARGET_INFO.items():
        ts = [t for t in targets if t["target"].startswith(key)]
        if not ts:
            continue
        where = meant_for(ts[0]["target"])
        here = (f"{where} target; on {device_word} informational, a FAIL is expected: {info['why_not']}"
                if ts[0].get("informational") else f"A goal on {where}: a FAIL here is a real shortfall")
        out.append(f"{info['name']}: {info['what']}. {here}.")
    return out


def targets_verdict(targets: list[dict], device_word: str) -> str:
    """One sentence: how many checks hold, and how many FAILs are on targets meant for this device."""
    fails = [t for t in targets if not t["holds"]]
    info = [t for t in fails if t.get("informational")]
    real = len(fails) - len(info)
    s = f"{len(targets) - len(fails)} of {len(targets)} checks hold"
    if fails:
        s += (f"; {len(fails)} FAIL: {real} on targets meant for {device_word}"
              + (f", {len(info)} on GPU-only targets (informational on {device_word})" if info else ""))
    return s + ". A FAIL does not change elit-bench's exit status."


def targets_text(targets: list[dict], device_word: str) -> list[str]:
    """The console's targets section: the legend, one line per check, the verdict."""
    lines = ["targets (each a ratio of this run that should be <= its limit; 'wall' = median wall time, 'cpu' = "
             "process CPU time):"]
    lines += [f"  - {x}" for x in targets_legend(targets, device_word)]
    names = {k: v["name"] for k, v in TARGET_INFO.items()}
    for t in targets:
        name = names[t["target"].split(" <=")[0]]
        tag = f"  ({t['meant_for']} target; on {device_word} informational)" if t.get("informational") else ""
        lines.append(f"  {'OK  ' if t['holds'] else 'FAIL'} {name:<21} {t['target']:<44} {t['clock']:<5} "
                     f"{t['preset']:<8} backend={t['backend']:<10} budget={t['budget']!s:<12} value={value_text(t)}{tag}")
    lines.append(targets_verdict(targets, device_word))
    return lines


def git_commit(path: str | None = None) -> str | None:
    try:
        here = path or os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def metadata(device: torch.device, extra: dict) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "python": platform.python_version(),
            "git_commit": git_commit(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cpu_threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in ("ELIT_TRITON_AUTOTUNE", "ELIT_BACKEND", "ELIT_VALIDATE", "TRITON_INTERPRET")
                    if k in os.environ}, **extra}


def write_text(path: str, text: str) -> str:
    """``text`` into ``path``, whole or not at all (``_cli.write_output``: OutputWriteError naming ``path``)."""
    from .._cli import write_output

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return write_output(path, write)


def write_outputs(out_dir: str, rows: list[dict], targets: list[dict], meta: dict) -> list[str]:
    """The four OUTPUT_FILES in ``out_dir``, each written whole or not at all (a temporary name renamed onto it:
    on a full disk an earlier file of the name is kept, never left empty or cut). A file that cannot be written
    raises ``_cli.OutputWriteError`` naming it; the files before it are written, the ones after it are not."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    json_name, csv_name, md_name, png_name = OUTPUT_FILES
    # Every row carries the metadata too, so a row copied out of the file still says where it came from.
    full = [{**r, "device": meta["device"], "torch": meta["torch"], "triton": meta["triton"],
             "git_commit": meta["git_commit"], "date": meta["date"]} for r in rows]
    paths.append(write_text(os.path.join(out_dir, json_name),
                            json.dumps({"metadata": meta, "targets": targets, "rows": full}, indent=1)))
    p = os.path.join(out_dir, csv_name)
    write_csv(p, full)
    paths.append(p)
    paths.append(write_text(os.path.join(out_dir, md_name), markdown_summary(rows, targets, meta)))
    p = os.path.join(out_dir, png_name)
    plot(rows, meta, p)
    paths.append(p)
    return paths


def write_csv(path: str, full_rows: list[dict]) -> None:
    """``results.csv``: one line per row of results.json (``full_rows``, each with its run's device, torch, triton,
    git_commit and date); whole or not at all (OutputWriteError naming ``path``)."""
    from .._cli import write_output

    fields = ROW_FIELDS + ["device", "torch", "triton", "git_commit", "date"]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for r in full_rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    write_output(path, write)


# What --replot reads of a results.json (check_targets, format_table, markdown_summary, run_findings, make_figure),
# and the type each field must have there. "?": null allowed. Every row key is required (write_outputs writes
# them all); the metadata keys are read with .get, so each may be missing.
_ROW_TYPES = {"preset": "str", "scenario": "str", "case": "str", "model": "str", "backend": "str",
              "budget": "int?", "budgets": "str?", "weak_budget": "int?", "batch": "int",
              "latents": "num", "latency_ms": "num?", "q1_ms": "num?", "q3_ms": "num?", "cpu_ms": "num?",
              "gflops": "num?", "latency_ratio": "num?", "cpu_ratio": "num?", "flops_ratio": "num?",
              "latency_over_flops": "num?", "cpu_over_flops": "num?", "peak_mem_mb": "num?"}
_META_TYPES = {"device": "str?", "device_type": "str?", "config": "str?", "dtype": "str?", "torch": "str?",
               "triton": "str?", "git_commit": "str?", "date": "str?", "resolution": "int?", "batch": "int?",
               "cpu_threads": "int?", "repeats": "int?", "repeats_done": "int?", "j_max": "int?", "groups": "int?"}
_KIND_WORDS = {"str": "a string", "int": "an integer", "num": "a finite number"}
# Row fields newer than some committed results.json files: checked with their type where present, and derived from
# the other fields where missing (``derive_rows``).
_NEW_ROW_TYPES = {"steps": "int?", "tflops": "num?", "pct_peak_flops": "num?"}


def derive_rows(rows: list[dict], meta: dict) -> list[dict]:
    """``rows`` of a checked results.json (``results_error``), each with the fields this version derives from the
    others filled where the file predates them: ``steps`` (None: the file has no sampling rows), ``tflops``
    (``gflops`` over ``latency_ms``, GFLOP/ms = TFLOP/s, as ``make_rows``) and ``pct_peak_flops`` (against
    ``meta["peaks"]["tflops"]`` when the run measured it; None otherwise). A row that has a field keeps its value;
    the rows given are not changed."""
    peaks = meta.get("peaks")
    peak = peaks.get("tflops") if isinstance(peaks, dict) else None
    peak = peak if _is_kind(peak, "num") and peak > 0 else None
    out = []
    for r in rows:
        r = dict(r)
        r.setdefault("steps", None)
        if "tflops" not in r:
            r["tflops"] = _tflops(r["gflops"], r["latency_ms"])
        if "pct_peak_flops" not in r:
            r["pct_peak_flops"] = _pct_of_peak(r["tflops"], peak)
        out.append(r)
    return out


def _type_word(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _is_kind(v, kind: str) -> bool:
    if kind == "str":
        return isinstance(v, str)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind == "int" and not isinstance(v, int)):
        return False
    try:
        return math.isfinite(float(v))  # NaN and Infinity load from JSON; an int past 1e308 does not fit a float
    except OverflowError:
        return False


def _field_error(obj: dict, key: str, want: str, where: str) -> str | None:
    kind, nullable = want.rstrip("?"), want.endswith("?")
    v = obj[key]
    if (v is None and nullable) or (v is not None and _is_kind(v, kind)):
        return None
    try:
        text = json.dumps(v, ensure_ascii=False)  # as the file spells it: null, true, "fast", NaN
    except (TypeError, ValueError):
        text = repr(v)
    text = text if len(text) <= 40 else text[:37] + "..."
    big = " within ±1e308" if isinstance(v, int) and not isinstance(v, bool) and kind != "str" else ""
    return (f"{where}.{key} is {text}{'' if v is None else f' ({_type_word(v)})'}; expected {_KIND_WORDS[kind]}{big}"
            + (" or null" if nullable else ""))


def results_error(data) -> str | None:
    """Why ``data`` (a loaded results.json) is not one that --replot can redraw, naming the first problem and where
    it is (the key, the row index); None when every field --replot reads is there with its type."""
    expected = 'expected an object with "metadata" and "rows", as elit-bench --out DIR writes it'
    if not isinstance(data, dict):
        return f"the top level is {_type_word(data)}; {expected}"
    for key, kind in (("metadata", dict), ("rows", list)):
        if key not in data:
            return f"no {key} at the top level; {expected}"
        if not isinstance(data[key], kind):
            return f"{key} is {_type_word(data[key])}; expected {_type_word(kind())}"
    md = data["metadata"]
    for key, want in _META_TYPES.items():
        if key in md and (why := _field_error(md, key, want, "metadata")):
            return why
    for i, r in enumerate(data["rows"]):
        where = f"rows[{i}]"
        if not isinstance(r, dict):
            return f"{where} is {_type_word(r)}; expected an object (one row of the table)"
        for key, want in _ROW_TYPES.items():
            if key not in r:
                kind = want.rstrip("?")
                return (f"{where} has no {key}; expected {_KIND_WORDS[kind]}" + (" or null" * want.endswith("?"))
                        + " there, as in every row elit-bench --out DIR writes")
            if why := _field_error(r, key, want, where):
                return why
        for key, want in _NEW_ROW_TYPES.items():
            if key in r and (why := _field_error(r, key, want, where)):
                return why
        # a timed row has its quartiles too (the IQR whiskers and the summary's IQR column subtract them)
        for have, need in (("latency_ms", "q1_ms"), ("latency_ms", "q3_ms"), ("q1_ms", "q3_ms")):
            if r[have] is not None and r[need] is None:
                return (f"{where}.{need} is null while {where}.{have} is {r[have]!r}; expected a finite number (a "
                        "timed row has its median and quartiles)")
        if r["q1_ms"] is not None and r["latency_ms"] is not None and not r["q1_ms"] <= r["latency_ms"] <= r["q3_ms"]:
            return (f"{where}: expected q1_ms <= latency_ms <= q3_ms (the median between its quartiles), got "
                    f"{r['q1_ms']!r}, {r['latency_ms']!r}, {r['q3_ms']!r}")
    return None


_MARKERS = "osD^vP*X"
_CASE_ORDER = {"mixed": ("ragged", "padded", "sum_of_parts"), "guidance": ("cfg", "ccfg_two_pass", "ccfg")}
_CASE_LABEL = {"ragged": "ragged (1 forward)", "padded": "padded", "sum_of_parts": "sum of parts",
               "cfg": "CFG", "ccfg_two_pass": "CCFG two-pass", "ccfg": "CCFG one-pass"}


def _merge_equal(series: list[tuple[str, list, list]]) -> list[tuple[str, list, list]]:
    """Series with the same points drawn once, labelled ``a = b``: no line hides under another."""
    out: list[list] = []
    for label, xs, ys in series:
        for o in out:
            if o[1] == xs and len(o[2]) == len(ys) and all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(o[2], ys)):
                o[0] += f" = {label}"
                break
        else:
            out.append([label, xs, ys])
    return [tuple(o) for o in out]


_LEGEND_PT = 9  # legend text, points
_NO_BAR = {("official", "ragged"): "one budget per batch:\nno ragged forward",
           ("official", "ccfg"): "one budget per batch:\nno one-pass CCFG"}


def _bars(ax, rows: list[dict], scenario: str, preset: str, title: str) -> None:
    """Grouped bars: one group per model/backend, one bar per case of ``scenario`` it ran (median, IQR whiskers).

    A group has only the bars of the cases it ran, side by side (no empty slots); the cases it cannot run are
    named under its tick label. Each bar's value is written inside it, clear of its whisker."""
    rs = [r for r in rows if r["preset"] == preset and r["scenario"] == scenario and r["latency_ms"] is not None]
    ax.set_title(title, fontsize=10)
    if not rs:
        ax.text(0.5, 0.5, f"{scenario}: not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return
    groups = list(dict.fromkeys(f"{r['model']}/{r['backend']}" for r in rs))
    cases = [c for c in _CASE_ORDER[scenario] if any(r["case"] == c for r in rs)]
    width = 0.8 / len(cases)
    ticks = []
    for g, name in enumerate(groups):
        mine = [(k, c, next(r for r in rs if r["case"] == c and f"{r['model']}/{r['backend']}" == name))
                for k, c in enumerate(cases) if any(r["case"] == c and f"{r['model']}/{r['backend']}" == name for r in rs)]
        for i, (k, case, r) in enumerate(mine):
            x = g - width * len(mine) / 2 + width * (i + 0.5)
            ax.bar(x, r["latency_ms"], width, color=f"C{k}", label=_CASE_LABEL[case],
                   yerr=[[r["latency_ms"] - r["q1_ms"]], [r["q3_ms"] - r["latency_ms"]]], capsize=3)
            # inside the bar, below its lower whisker: the whisker never crosses the number
            ax.text(x, min(r["q1_ms"], r["latency_ms"]) * 0.5, f"{r['latency_ms']:.0f}", ha="center", va="center",
                    fontsize=8, color="white", rotation=90 if width < 0.25 else 0)
        missing = [_NO_BAR.get((name.split("/")[0], c), f"no {_CASE_LABEL[c]}") for c in cases
                   if c not in {m[1] for m in mine}]
        ticks.append("\n".join([name] + missing))
    ax.set_xticks(range(len(groups)), ticks, fontsize=8)
    ax.set_ylabel("latency, ms (median; whiskers: IQR)")
    top = max(r["q3_ms"] if r["q3_ms"] is not None else r["latency_ms"] for r in rs)
    ax.set_ylim(0, 1.3 * top)  # a free band above the bars for the legend
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))  # one entry per case, however many groups have it
    ax.legend(seen.values(), seen.keys(), fontsize=_LEGEND_PT, loc="upper center", ncol=len(seen),
              handlelength=1.2, columnspacing=0.8)


def figure_caption(meta: dict) -> str:
    """What the figure's symbols mean (printed under it)."""
    g, jm = meta.get("groups"), meta.get("j_max")
    return ("J̃: the budget, latents per group (1..J_max); J_max: a group's full set of latents"
            + (f" ({jm})" if jm else "") + "; G: groups (windows) per image" + (f" ({g})" if g else "")
            + ", so G·J̃ = latents per sample. elit = our model, one ragged batch; official/sdpa_dense = the same "
            "weights run the official code's way (dense SDPA, one budget per batch).\n"
            "Dashed gray line: a plain DiT of the same size (every block attends over all N spatial tokens, no "
            "latents), one latency for every budget. Markers and bars: median of interleaved repeats; whiskers: "
            "interquartile range. Relative panel: each series divided by the same model and backend at J_max.")


def make_figure(rows: list[dict], meta: dict):
    """The figure of ``latency_vs_latents.png``: one row of four titled panels per preset, and a caption.

    1. uniform budgets: latency vs latents per sample, every model/backend (plain DiT as a dashed line);
    2. the same relative to J_max, with FLOPs/full (identical series are drawn once, labelled ``a = b``);
    3. mixed batch: one ragged forward vs padded vs one forward per budget (bars);
    4. guidance: CFG vs two-pass CCFG vs one-pass ragged CCFG (bars).
    Latency axes start at zero; the caption (``figure_caption``) explains J̃, J_max, G·J̃ and the plain-DiT line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows)) or ["paper"]
    fig, axes = plt.subplots(len(presets), 4, figsize=(21, 4.9 * len(presets) + 0.8), squeeze=False)
    names = sorted({f"{r['model']}/{r['backend']}" for r in rows if r["scenario"] == "uniform" and r["case"] == "uniform"})
    style = {n: (f"C{i}", _MARKERS[i % len(_MARKERS)]) for i, n in enumerate(names)}
    g = meta.get("groups")
    xlabel = "latents per sample, G·J̃" + (f" (G = {g} groups)" if g else "")
    for row_i, preset in enumerate(presets):
        ax_lat, ax_rel, ax_mix, ax_guid = axes[row_i]
        uni = [r for r in rows if r["preset"] == preset and r["scenario"] == "uniform" and r["case"] == "uniform"
               and r["latency_ms"] is not None]
        rel_lines, flop_lines = [], []
        for name in names:
            rs = sorted((r for r in uni if f"{r['model']}/{r['backend']}" == name), key=lambda r: r["latents"])
            if not rs:
                continue
            color, marker = style[name]
            xs = [r["latents"] for r in rs]
            ax_lat.errorbar(xs, [r["latency_ms"] for r in rs], marker=marker, color=color, capsize=3, label=name,
                            yerr=[[r["latency_ms"] - r["q1_ms"] for r in rs], [r["q3_ms"] - r["latency_ms"] for r in rs]])
            if all(r["latency_ratio"] is not None for r in rs):
                rel_lines.append((f"latency/full {name}", xs, [r["latency_ratio"] for r in rs]))
            if all(r["flops_ratio"] is not None for r in rs):
                flop_lines.append((f"FLOPs/full {name}", xs, [r["flops_ratio"] for r in rs]))
        for r in rows:
            if r["preset"] == preset and r["model"] == "plain" and r["latency_ms"] is not None:
                ax_lat.axhline(r["latency_ms"], ls="--", lw=1, color="gray",
                               label=f"plain DiT/{r['backend']} (all N tokens)")
        for i, (label, xs, ys) in enumerate(_merge_equal(rel_lines)):
            ax_rel.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], color=f"C{i}", label=label)
        for i, (label, xs, ys) in enumerate(_merge_equal(flop_lines)):
            ax_rel.plot(xs, ys, ls="--", marker="x", color="black" if i == 0 else f"C{i + 5}", label=label)
            ax_rel.plot(xs, [LATENCY_TARGET * y for y in ys], ls=":", lw=1, color="gray",
                        label=f"target {LATENCY_TARGET} × FLOPs/full" if i == 0 else None)
        ticks = sorted({r["latents"] for r in uni})
        for ax in (ax_lat, ax_rel):
            ax.set_xscale("log", base=2)
            if ticks:
                ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
                ax.minorticks_off()
            ax.set_xlabel(xlabel)
            if not uni:
                ax.text(0.5, 0.5, "uniform: not run", ha="center", va="center", transform=ax.transAxes)
        # Both start at zero: a cropped axis makes a 10 % difference look like a factor.
        ax_lat.set_ylim(0, 1.35 * max([r["q3_ms"] or r["latency_ms"] for r in uni]
                                      + [r["latency_ms"] for r in rows if r["preset"] == preset and r["model"] == "plain"
                                         and r["latency_ms"] is not None] or [1.0]))
        rel_top = max([y for _, _, ys in rel_lines + flop_lines for y in ys] or [1.0])
        ax_rel.set_ylim(0, 1.35 * max(rel_top, LATENCY_TARGET))
        ax_lat.set_ylabel("forward latency, ms (median; whiskers: IQR)")
        ax_rel.set_ylabel("relative to J_max (same model and backend)")
        ax_lat.set_title(f"{preset}: uniform budgets, latency", fontsize=10)
        ax_rel.set_title(f"{preset}: uniform budgets, latency and FLOPs relative to J_max", fontsize=10)
        mb = next((r["budgets"] for r in rows if r["preset"] == preset and r["scenario"] == "mixed"
                   and r["case"] == "ragged"), "")
        _bars(ax_mix, rows, "mixed", preset, f"{preset}: mixed batch (budgets {mb})")
        jw = next((r["weak_budget"] for r in rows if r["preset"] == preset and r["scenario"] == "guidance"
                   and r["weak_budget"] is not None), None)
        _bars(ax_guid, rows, "guidance", preset, f"{preset}: guidance at J_max (weak J̃ = {jw})")
        for ax in (ax_lat, ax_rel):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=_LEGEND_PT, loc="upper left")
    label = "CPU" if meta.get("device_type") != "cuda" else "GPU"
    dev = str(meta.get("device"))
    fig.suptitle(f"{label}: {dev[len(label) + 2:] if dev.startswith(label + ': ') else dev} — {meta.get('config')} "
                 f"{meta.get('resolution')}px, batch {meta.get('batch')}, {meta.get('dtype')} — torch {meta.get('torch')}, "
                 f"{(meta.get('git_commit') or '')[:12]}", fontsize=11)
    fig.text(0.01, 0.005, figure_caption(meta), ha="left", va="bottom", fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, 0.6 / (4.9 * len(presets) + 0.8), 1, 1))
    return fig


def plot(rows: list[dict], meta: dict, path: str) -> None:
    """The figure as a PNG at ``path``, whole or not at all (OutputWriteError naming ``path``)."""
    import matplotlib.pyplot as plt

    from .._cli import write_output

    fig = make_figure(rows, meta)
    try:
        write_output(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))  # the temporary name ends in .tmp
    finally:
        plt.close(fig)


def markdown_summary(rows: list[dict], targets: list[dict], meta: dict) -> str:
    """A short markdown table of the run (written as DIR/summary.md), labelled CPU or GPU."""
    label = "CPU" if meta.get("device_type") != "cuda" else "GPU"
    out = [f"### {label}: {meta.get('config')} {meta.get('resolution')}px, batch {meta.get('batch')}, {meta.get('dtype')}",
           "",
           f"device: {meta.get('device')} · torch {meta.get('torch')} · triton {meta.get('triton')} · "
           f"commit {meta.get('git_commit')} · {meta.get('date')} · threads {meta.get('cpu_threads')} · "
           f"repeats {meta.get('repeats_done', meta.get('repeats'))} (interleaved, medians)",
           "",
           "| preset | scenario | case | model | backend | budgets | latents/sample | median ms | IQR ms | CPU-time ms | GFLOPs "
           "| TFLOP/s | % peak | lat/full | CPU-time/full | FLOPs/full | peak MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    peaks = meta.get("peaks")
    if isinstance(peaks, dict) and isinstance(peaks.get("tflops"), (int, float)):  # older results have none
        out[4:4] = [f"% peak: TFLOP/s against {peaks['tflops']:.4g} TFLOP/s, the {peaks.get('dtype')} matmul rate "
                    "measured on this device in the same run (`bench.timing.measure_peaks`).", ""]
    for r in rows:
        iqr = f"{r['q1_ms']:.1f}–{r['q3_ms']:.1f}" if r["q1_ms"] is not None else "-"
        out.append(f"| {r['preset']} | {r['scenario']} | {r['case']} | {r['model']} | {r['backend']} | {r['budgets'] or '-'} | "
                   f"{r['latents']:g} | {_fmt(r['latency_ms'], 1)} | {iqr} | {_fmt(r['cpu_ms'], 1)} | {_fmt(r['gflops'], 2)} | "
                   f"{_fmt(r.get('tflops'), 3)} | {_fmt(r.get('pct_peak_flops'), 1)} | {_fmt(r['latency_ratio'], 3)} | {_fmt(r['cpu_ratio'], 3)} | {_fmt(r['flops_ratio'], 3)} | "
                   f"{_fmt(r['peak_mem_mb'], 1)} |")
    if targets:
        out += ["", "Targets: each a ratio of this run that should be <= its limit; `wall` = median wall time, `cpu` = "
                "process CPU time. A FAIL on a target meant for another device is expected (informational).", ""]
        out += [f"- {x}" for x in targets_legend(targets, label)]
        out += ["", "| target | clock | preset | backend | budget | value | verdict | meant for |",
                "|---|---|---|---|---|---|---|---|"]
        for t in targets:
            out.append(f"| {t['target']} | {t['clock']} | {t['preset']} | {t['backend']} | {t['budget']} | {value_text(t)} | "
                       f"{'OK' if t['holds'] else 'FAIL'} | {t['meant_for']}"
                       + (f" (informational on {label})" if t.get("informational") else "") + " |")
        out += ["", targets_verdict(targets, label)]
    return "\n".join(out + [""] + run_findings(rows, meta) + [""] + HOW_TO_READ) + "\n"


HOW_TO_READ = """## How to read this

- **preset**: `paper` is the paper's ELIT-DiT (`elit_config`), `released` the architecture of the released
  ELIT-SiT code and checkpoints (`elit_sit_config`); same size, different details (docs/design.md §6 in the repository).
- **model `elit`**, backend = a `varlen_attention` backend: our model. One ragged batch, any budget per sample;
  Read, Write and core attention over packed segments.
- **model `official`, backend `sdpa_dense`**: the same weights run the way the official ELIT code runs them:
  spatial tokens reshaped into `(B·G, P, C)` windows, every attention one dense `scaled_dot_product_attention`,
  adaLN broadcast per sample, and **one budget for the whole batch** (released preset: Read/Write over all P
  latents, the kept ones gathered for the core). It cannot run a ragged batch: no `ragged` mixed row, no one-pass CCFG.
- **model `plain`**: a plain DiT of the same size (every block attends over all N spatial tokens); its ratio is
  to ELIT at J_max.
- **uniform**: every sample at budget J̃. `lat/full`, `CPU-time/full` and `FLOPs/full` divide by the same model
  and backend at J_max. Targets: lat/full <= 1.10 × FLOPs/full (latency falls as fast as the work), and
  elit <= 1.00 × official/sdpa_dense at every budget.
- **mixed**: a batch with a budget per sample. `ragged` = one forward; `padded` = every sample run at the
  largest budget; `sum_of_parts` = one forward per distinct budget, what a one-budget-per-batch implementation
  (the official code) must do. Target: elit ragged <= 0.95 × the official/sdpa_dense sum_of_parts.
- **guidance** at J_max (`budgets` lists every per-sample budget of a call: `16x4,1x4` = 4 samples at 16, then 4 at 1):
  `cfg` = conditional and unconditional halves at J_max, one batch of 2B; `ccfg_two_pass` = conditional at J_max,
  then the unconditional weak pass at the weak budget, two forwards (the official way); `ccfg` = both halves as
  one ragged batch. The **guidance ratios** (`lat/full`, `FLOPs/full` of these rows) are relative to CFG of the
  same model and backend: FLOPs/full is the work CCFG saves, lat/full what that saving is worth here.
  Target: `ccfg` <= 0.90 × `ccfg_two_pass` of the same model and backend.
- **sampling** (asked for with `--scenarios sampling`): a whole CCFG sampling run of the batch, Euler with
  `sampling_steps` steps (metadata), conditional at J_max and the unconditional weak pass at the weak budget:
  `ccfg` on our model = one ragged pass per step; `ccfg_two_pass` on official/sdpa_dense = two dense passes per
  step, the official sampler. `images_per_s` and `steps_per_s` per row; `warmup_s` (every row) is the warm-up
  phase, which holds a `+compile` case's compilation and a `+graph` case's captures. Target: `ccfg` <= 0.50 ×
  the official sampler's time (>= 2× its images/s).
- **median ms / IQR**: wall clock over interleaved repeats (every repeat visits every case, in a seeded shuffled
  order); **CPU-time ms** (CPU runs): process CPU time, which on a shared machine leaves out waiting for a core.
- **When the dense path is faster, and why** (the findings above say whether it was in this run): at equal FLOPs
  it does the least around the matmuls. With one budget per batch every window has the same length, so each
  attention is one fused `scaled_dot_product_attention` call on a dense `[B·G, H, L, D]` batch. The ragged path
  matches it when its segments come in runs of equal length: the `torch` backend then runs one dense SDPA per
  run on views of the packed tensors (eager mode). A CPU profile of the default config (S/2, 256px, batch 4,
  J̃ = 16, both presets, 2026-11-29) found the two within 1% in CPU time. Where segments come in many lengths,
  under torch.compile, or when a log-sum-exp is needed, the `torch` backend takes its grouped path instead:
  each segment's rows gathered into length buckets and an unfused softmax (`bmm`, mask, `exp`, sum); profiled
  at the same config before the run path existed, that cost 280–340 ms per forward against 120 ms for the
  fused SDPA. The `triton` and `cuda` kernels are meant to close that gap on a GPU. The ragged path's own
  ground is what the dense path cannot run at all: mixed budgets in one batch and one-pass CCFG.
""".splitlines()


def run_findings(rows: list[dict], meta: dict) -> list[str]:
    """What this run's rows say, per preset: dense vs ragged at J_max, the mixed batch, guidance."""
    label = "CPU" if meta.get("device_type") != "cuda" else "GPU"
    # On CPU the process CPU time: on a shared machine the wall clock also counts waiting for a core.
    ms = "cpu_ms" if rows and all(r["cpu_ms"] is not None for r in rows if r["latency_ms"] is not None) else "latency_ms"
    clock = "CPU time" if ms == "cpu_ms" else "median wall time"
    out = [f"## In this run ({label}; {clock}, medians)", ""]
    by = _by_key(rows)
    jm = meta.get("j_max")
    for preset in dict.fromkeys(r["preset"] for r in rows):
        dense = by.get((preset, "uniform", "uniform", "official", "sdpa_dense", jm))
        for r in rows:
            if (r["preset"], r["scenario"], r["model"], r["budget"]) != (preset, "uniform", "elit", jm) or not r[ms]:
                continue
            be = r["backend"]
            if dense and dense[ms]:
                q = r[ms] / dense[ms]
                verdict = (f"the dense path is faster, elit takes {q:.2f}× its time (see *When the dense path is "
                           "faster, and why* below)" if q > 1.02 else f"the ragged path is faster ({q:.2f}× the dense time)"
                           if q < 0.98 else "about equal")
                out.append(f"- {preset}, J̃ = {jm}: elit/{be} {r[ms]:.1f} ms vs official/sdpa_dense "
                           f"{dense[ms]:.1f} ms: {verdict}.")
            mixed = [x for x in rows if (x["preset"], x["scenario"], x["model"], x["backend"]) == (preset, "mixed", "elit", be)
                     and x[ms]]
            mix = {x["case"]: x for x in mixed}
            if {"ragged", "padded", "sum_of_parts"} <= set(mix):
                rg, pd, sp = (mix[c][ms] for c in ("ragged", "padded", "sum_of_parts"))
                out.append(f"- {preset}, mixed budgets {mix['ragged']['budgets']} on {be}: one ragged forward {rg:.1f} ms, "
                           f"padded {pd:.1f} ms ({pd / rg:.2f}× the ragged time), one forward per budget {sp:.1f} ms ({sp / rg:.2f}×).")
            guid = {x["case"]: x for x in rows if (x["preset"], x["scenario"], x["model"], x["backend"])
                    == (preset, "guidance", "elit", be) and x[ms]}
            if {"cfg", "ccfg_two_pass", "ccfg"} <= set(guid):
                ratio = "cpu_ratio" if ms == "cpu_ms" else "latency_ratio"
                parts = ", ".join(f"{c} {guid[c][ms]:.1f} ms ({'CPU-time' if ms == 'cpu_ms' else 'lat'}/full "
                                  f"{_fmt(guid[c][ratio], 2)}, "
                                  f"FLOPs/full {_fmt(guid[c]['flops_ratio'], 2)})" for c in ("cfg", "ccfg_two_pass", "ccfg"))
                out.append(f"- {preset}, guidance on {be}: {parts}.")
        off = by.get((preset, "sampling", "ccfg_two_pass", "official", "sdpa_dense", jm))
        for r in rows:
            if (r["preset"], r["scenario"], r["case"]) != (preset, "sampling", "ccfg") or not r[ms]:
                continue
            took = f"{r[ms] / 1e3:.2f} s" if r[ms] >= 1e3 else f"{r[ms]:.1f} ms"
            vs = (f"; the official sampler {off[ms]:.1f} ms ({off[ms] / r[ms]:.2f}× our time)" if off and off[ms] else "")
            out.append(f"- {preset}, sampling on {r['backend']}: {r['steps']} CCFG steps of {r['batch']} images in "
                       f"{took} ({r['batch'] / (r[ms] / 1e3):.2f} images/s){vs}.")
    if len(out) == 2:
        out.append("- (no full-budget ELIT row was timed)")
    return out
