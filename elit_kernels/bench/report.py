"""Rows, the stdout table, the target checks and the output files (results.json / .csv / .png)."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess

import torch

from .timing import Case, summarize

LATENCY_TARGET = 1.15  # latency(J̃)/latency(J_max) <= 1.15 × FLOPs(J̃)/FLOPs(J_max)
MIXED_TARGET = 1.10  # one ragged batch <= 1.1 × the sum of its one-budget parts

ROW_FIELDS = ["preset", "scenario", "case", "model", "backend", "budget", "budgets", "weak_budget", "batch", "latents",
              "latency_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "cpu_ms", "cpu_q1_ms", "cpu_q3_ms", "repeats", "gflops", "attention_gflops",
              "latency_ratio", "flops_ratio", "latency_over_flops", "cpu_ratio", "cpu_over_flops", "peak_mem_mb", "note"]


def _compact(budgets: list[int]) -> str:
    if not budgets:
        return ""
    if len(set(budgets)) == 1:
        return f"{budgets[0]}x{len(budgets)}"
    return ",".join(str(j) for j in budgets)


def make_rows(cases: list[Case], device: torch.device) -> list[dict]:
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
               "latency_ratio": None, "flops_ratio": None, "latency_over_flops": None, "cpu_ratio": None,
               "cpu_over_flops": None,
               "peak_mem_mb": c.peak_mem_mb, "note": c.note}
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


def check_targets(rows: list[dict]) -> list[dict]:
    """The two targets, one entry per checked row and clock (ELIT varlen path only).

    ``clock`` "wall" uses latency_ms; "cpu" (CPU runs only) uses the process CPU time, which on a
    shared machine is the compute without the time spent waiting for a core.
    """
    out = []
    for clock, ratio_key, ms_key in (("wall", "latency_over_flops", "latency_ms"), ("cpu", "cpu_over_flops", "cpu_ms")):
        for r in rows:
            if r["scenario"] == "uniform" and r["model"] == "elit" and r[ratio_key] is not None:
                out.append({"target": "latency_ratio <= 1.15 x flops_ratio", "clock": clock, "preset": r["preset"],
                            "backend": r["backend"], "budget": r["budget"], "value": r[ratio_key],
                            "holds": r[ratio_key] <= LATENCY_TARGET})
        mixed = {(r["preset"], r["model"], r["backend"], r["case"]): r for r in rows if r["scenario"] == "mixed"}
        for (preset, model, be, case), r in mixed.items():
            parts = mixed.get((preset, model, be, "sum_of_parts"))
            if case == "ragged" and parts and parts[ms_key] and r[ms_key]:
                v = r[ms_key] / parts[ms_key]
                out.append({"target": "mixed ragged <= 1.1 x sum of parts", "clock": clock, "preset": preset,
                            "backend": be, "budget": r["budgets"], "value": v, "holds": v <= MIXED_TARGET})
    return out


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def format_table(rows: list[dict], targets: list[dict], device_label: str) -> str:
    cols = [("preset", 8), ("scenario", 9), ("case", 13), ("model", 8), ("backend", 11), ("budgets", 14), ("latents", 7),
            ("latency_ms", 10), ("q1_ms", 8), ("q3_ms", 8), ("cpu_ms", 8), ("gflops", 8), ("latency_ratio", 7),
            ("cpu_ratio", 7), ("flops_ratio", 7), ("peak_mem_mb", 9)]
    heads = {"latency_ms": "median_ms", "latency_ratio": "lat/full", "flops_ratio": "flop/full", "peak_mem_mb": "peak_MiB",
             "cpu_ms": "cpu_ms", "cpu_ratio": "cpu/full"}
    lines = [f"ELIT model latency vs budget — {device_label}"]
    lines.append("  ".join(heads.get(c, c).rjust(w) for c, w in cols))
    for r in rows:
        vals = []
        for c, w in cols:
            v = r[c]
            if c == "latents" and isinstance(v, float):
                v = f"{v:g}"
            vals.append(_fmt(v, 3 if c.endswith("ratio") else 2)[:max(w, 14)].rjust(w))
        lines.append("  ".join(vals))
    if targets:
        lines.append("")
        lines.append("targets:")
        for t in targets:
            lines.append(f"  {'OK  ' if t['holds'] else 'FAIL'} {t['target']:<38} {t['clock']:<5} {t['preset']:<8} "
                         f"backend={t['backend']:<10} "
                         f"budget={t['budget']!s:<12} value={t['value']:.3f}")
    return "\n".join(lines)


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


def write_outputs(out_dir: str, rows: list[dict], targets: list[dict], meta: dict) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    # Every row carries the metadata too, so a row copied out of the file still says where it came from.
    full = [{**r, "device": meta["device"], "torch": meta["torch"], "triton": meta["triton"],
             "git_commit": meta["git_commit"], "date": meta["date"]} for r in rows]
    p = os.path.join(out_dir, "results.json")
    with open(p, "w") as f:
        json.dump({"metadata": meta, "targets": targets, "rows": full}, f, indent=1)
    paths.append(p)
    p = os.path.join(out_dir, "results.csv")
    fields = ROW_FIELDS + ["device", "torch", "triton", "git_commit", "date"]
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in full:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    paths.append(p)
    p = os.path.join(out_dir, "summary.md")
    with open(p, "w") as f:
        f.write(markdown_summary(rows, targets, meta))
    paths.append(p)
    p = os.path.join(out_dir, "latency_vs_latents.png")
    plot(rows, meta, p)
    paths.append(p)
    return paths


def plot(rows: list[dict], meta: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {}
    for r in rows:
        if r["scenario"] == "uniform" and r["case"] == "uniform" and r["latency_ms"] is not None:
            series.setdefault(f"{r['preset']} {r['model']}/{r['backend']}", []).append(r)
    for name, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["latents"])
        xs = [r["latents"] for r in rs]
        ax1.errorbar(xs, [r["latency_ms"] for r in rs],
                     yerr=[[r["latency_ms"] - r["q1_ms"] for r in rs], [r["q3_ms"] - r["latency_ms"] for r in rs]],
                     marker="o", capsize=3, label=name)
        if all(r["gflops"] is not None for r in rs):
            ax2.plot(xs, [r["gflops"] for r in rs], marker="o", label=name)
    for r in rows:
        if r["model"] == "plain" and r["latency_ms"] is not None:
            ax1.axhline(r["latency_ms"], ls="--", lw=1, color="gray", label=f"{r['preset']} plain DiT/{r['backend']} (N tokens)")
            if r["gflops"] is not None:
                ax2.axhline(r["gflops"], ls="--", lw=1, color="gray", label=f"{r['preset']} plain DiT/{r['backend']}")
    ax1.set_xscale("log", base=2)
    ax2.set_xscale("log", base=2)
    ax1.set_xlabel("latents per sample (G·J̃)")
    ax2.set_xlabel("latents per sample (G·J̃)")
    ax1.set_ylabel("forward latency, ms (median, IQR bars)")
    ax2.set_ylabel("forward GFLOPs (batch)")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    label = "CPU" if meta.get("device_type") != "cuda" else "GPU"
    dev = str(meta.get("device"))
    fig.suptitle(f"{label}: {dev[len(label) + 2:] if dev.startswith(label + ': ') else dev} — {meta.get('config')} {meta.get('resolution')}px, batch "
                 f"{meta.get('batch')}, {meta.get('dtype')} — torch {meta.get('torch')}, {(meta.get('git_commit') or '')[:12]}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
           "| lat/full | CPU-time/full | FLOPs/full |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        iqr = f"{r['q1_ms']:.1f}–{r['q3_ms']:.1f}" if r["q1_ms"] is not None else "-"
        out.append(f"| {r['preset']} | {r['scenario']} | {r['case']} | {r['model']} | {r['backend']} | {r['budgets'] or '-'} | "
                   f"{r['latents']:g} | {_fmt(r['latency_ms'], 1)} | {iqr} | {_fmt(r['cpu_ms'], 1)} | {_fmt(r['gflops'], 2)} | "
                   f"{_fmt(r['latency_ratio'], 3)} | {_fmt(r['cpu_ratio'], 3)} | {_fmt(r['flops_ratio'], 3)} |")
    if targets:
        out += ["", "| target | clock | preset | backend | budget | value | holds |", "|---|---|---|---|---|---|---|"]
        for t in targets:
            out.append(f"| {t['target']} | {t['clock']} | {t['preset']} | {t['backend']} | {t['budget']} | {t['value']:.3f} | "
                       f"{'yes' if t['holds'] else 'NO'} |")
    return "\n".join(out) + "\n"
