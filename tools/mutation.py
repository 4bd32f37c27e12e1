"""Mutation testing of the modules whose tests are fast, with mutmut, one module at a time, plus a short list
of hand-planted Triton kernel mutants checked under the interpreter. Outside CI (minutes per module on 2 cores).

    python tools/mutation.py                       # every module below, then the Triton mutants
    python tools/mutation.py layout flow           # some of them
    python tools/mutation.py --list [MODULE ...]   # the modules (those named) and their tests
    python tools/mutation.py --report              # rewrite mutation.md after editing mutation_reasons.json

For each module it copies the working tree (the built ``_C`` included) to a scratch directory, writes a
``[mutmut]`` section naming that module and its test subset, runs ``mutmut run`` there and reads
``mutmut results``. Error-message strings of ``raise`` / ``warnings.warn`` statements are not mutated (a
message's wording is not behaviour; the tests match the argument name at its start). Killed and timed-out
mutants count as caught. Writes ``benchmarks/results/mutation.md``: the score per module, the date and
commit, and every surviving mutant with its diff, to be explained (equivalent) or turned into a test.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {  # name -> (paths to mutate, tests that cover them)
    "layout": (["elit_kernels/layout.py"], ["tests/test_layout.py", "tests/test_model.py::test_run_broadcast_path_equals_the_gather_path"]),
    "flow": (["elit_kernels/flow.py"], ["tests/test_flow.py", "tests/test_model.py"]),
    # -k "not compile": torch.compile cannot trace mutmut's trampolines (a ContextVar.set per call), so the
    # compile tests fail on the unmutated code of modules on the compiled path (test_dropin's
    # segment-longer-than-max_seqlen check, "never_garbage", compiles too); the CI suite runs them.
    # The attention package (elit_kernels/attention/): the contract and its inputs, AttentionPlan, the registry,
    # dispatch and the known-answer gate, the pure-PyTorch backends; tests/test_contract.py runs every backend on
    # the shared case table (tests/cases.py), tests/test_dispatch.py holds dispatch's own tests.
    "attention": (["elit_kernels/attention/__init__.py", "elit_kernels/attention/inputs.py",
                   "elit_kernels/attention/plan.py"],
                  ["tests/test_attention.py", "tests/test_validation.py", "tests/test_window_softcap.py",
                   "tests/test_dropin.py", "tests/test_contract.py", "tests/test_plan.py", "tests/test_deterministic.py",
                   "-k", "not compile and not triton and not never_garbage"]),
    "backends": (["elit_kernels/attention/registry.py", "elit_kernels/attention/dispatch.py",
                  "elit_kernels/attention/known_answer.py"],
                 ["tests/test_attention.py", "tests/test_known_answer.py", "tests/test_window_softcap.py",
                  "tests/test_torch_backend.py", "tests/test_dropin.py", "tests/test_backends.py",
                  "tests/test_dispatch.py", "tests/test_contract.py", "tests/test_deterministic.py",
                  "tests/test_backends_more.py", "-k",
                  "not compile and not triton and not never_garbage"]),
    # dropin: flash-attn's entry points (flash_attn_varlen_func, the qkv/kv-packed ones, flash_attn_func): the
    # refusals of what we do not implement, the flags flash-attn takes as ints, the packed and dense layouts.
    # test_attention.py only for its three drop-in tests (the whole file is a minute alone); ~60 s in all.
    "dropin": (["elit_kernels/dropin.py"],
               ["tests/test_dropin.py", "tests/test_window_softcap.py", "tests/test_deterministic.py",
                "tests/test_flags.py", "tests/test_attention.py::test_flash_attn_drop_in_signature_positional",
                "tests/test_attention.py::test_flash_attn_unsupported_options_raise",
                "tests/test_attention.py::test_flash_attn_unsupported_options_are_named_parameters",
                "tests/test_mutation_round40.py", "-k", "not compile and not triton and not never_garbage"]),
    "torch_attention": (["elit_kernels/attention/backends/torch_ops.py", "elit_kernels/attention/backends/pytorch.py"],
                        ["tests/test_torch_backend.py", "tests/test_attention.py", "tests/test_window_softcap.py",
                         "tests/test_contract.py", "tests/test_plan.py", "-k", "not compile and not triton"]),
    "reference": (["elit_kernels/reference/"], ["tests/test_attention.py", "tests/test_model.py", "tests/test_layout.py",
                                                "tests/test_window_softcap.py", "tests/test_torch_backend.py",
                                                "tests/test_dropin.py", "-k", "not compile and not triton and not never_garbage"]),
    "flops": (["elit_kernels/bench/flops.py"], ["tests/test_bench.py::test_attention_flops_pinned_by_hand",
                                                 "tests/test_bench.py::test_model_flops_match_an_independent_count",
                                                 "tests/test_bench.py::test_flop_count_matches_analytic_attention_and_leaves_no_stub"]),
    # models: on the torch/reference backends (the interpreted-Triton cases are minutes each); the overfit
    # test is a smoke test that trains for 120 steps and checks no value the mutants change. The loader and
    # sampling tests of test_official are left to "checkpoint": every surviving mutant runs all the tests
    # that reach it, and with them one mutant cost about a minute here (four of them then ran interpreted
    # Triton through default dispatch; they use the torch backend now: test_official's selection takes ~11 s).
    "models": (["elit_kernels/models/blocks.py", "elit_kernels/models/elit_dit.py", "elit_kernels/elementwise.py",
                "elit_kernels/models/config.py"],
               ["tests/test_model.py", "tests/test_blocks.py", "tests/test_config.py", "tests/test_official.py",
                "tests/test_plan.py::test_the_model_forward_checks_and_dispatches_only_on_a_layouts_first_forward",
                "tests/test_layout.py::test_the_elementwise_ops_view_a_whole_run_and_slice_the_others_to_the_same_values",
                "tests/test_flow_round41.py::test_elementwise_eps_is_checked_in_every_implementation", "-k",
                "not compile and not triton and not overfit and not sampling_runs and not convert and not hostile "
                "and not loader and not legacy and not bare_state and not other_sizes and not official_key"]),
    # our file format and the official checkpoints' loader (depth, arch and key checks, conversion), with the
    # hostile-user tests of both (tests/test_checkpoint_round41.py) and the tests written against this group's
    # survivors (tests/test_checkpoint_mutants.py); ~20 s for the whole selection here
    "checkpoint": (["elit_kernels/models/checkpoint.py", "elit_kernels/official/loader.py"],
                   ["tests/test_official.py", "tests/test_checkpoint_round41.py", "tests/test_checkpoint_mutants.py",
                    "-k", "not compile and not triton"]),
    # elit-sample's rules (per-index seeds, labels, budget mixes, canonical batches), its files (atomic writes,
    # damaged-file detection, the streamed .npz) and its option checks; run.py's orchestration is left to the
    # end-to-end tests. The torchrun tests start two processes per mutant (seconds each): left to CI.
    "sample": (["elit_kernels/sample/rules.py", "elit_kernels/sample/files.py", "elit_kernels/sample/options.py"],
               ["tests/test_sample.py", "tests/test_sample_rules.py", "-k",
                "not torchrun and not two_process and not failing_rank"]),
}
NO_MUTATE = [r"^\s*raise \w+(Error|Exception)\(", r"warnings\.warn\(", r"^\s*log\.\w+\("]

# Hand-planted Triton mutants: (name, file, original text, mutated text, test selection). Each must make the
# selected interpreter tests fail.
TRITON_MUTANTS = [
    ("dK/dV causal first row off by one", "elit_kernels/_triton/attention_bwd.py",
     "first_row = tl.maximum(nb * BLOCK_N - (len_k - len_q), 0)",
     "first_row = tl.maximum(nb * BLOCK_N - (len_k - len_q) + 1, 0)",
     ["tests/test_attention.py", "-k", "tile_size and triton"]),
    ("no bf16 upcast under the interpreter", "elit_kernels/_triton/_common.py",
     '"UPCAST": bool(interpreting() and dtype == torch.bfloat16)', '"UPCAST": False',
     ["tests/test_triton_attention.py", "-k", "mis_multiplies"]),
]


def _copy_tree(dst: Path) -> None:
    for name in ("elit_kernels", "tests", "csrc", "setup.py"):  # csrc: tests read the CUDA sources' head dims
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "mutants"))
        else:
            shutil.copy(src, dst / name)


def run_module(name: str, keep: bool) -> dict:
    paths, tests = MODULES[name]
    work = Path(tempfile.mkdtemp(prefix=f"mutation_{name}_"))
    commit = _commit()  # the code the mutants are made from (HEAD may move while mutmut runs)
    _copy_tree(work)
    (work / "setup.cfg").write_text(
        "[mutmut]\n"
        + "source_paths=\n" + "".join(f"    {p}\n" for p in paths)
        + "also_copy=\n    elit_kernels\n    csrc\n"
        + "pytest_add_cli_args_test_selection=\n" + "".join(f"    {t}\n" for t in tests)
        + "pytest_add_cli_args=\n    -p\n    no:cacheprovider\n    -x\n"
        + "do_not_mutate_patterns=\n" + "".join(f"    {p}\n" for p in NO_MUTATE)
        + "mutate_only_covered_lines=true\n")
    # One intra-op thread: torch's OpenMP pool does not survive the fork of each mutant's worker (every test
    # then hangs to its timeout), and the tests here are small.
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"== {name}: mutmut run in {work}", flush=True)
    subprocess.run([sys.executable, "-m", "mutmut", "run"], cwd=work, env=env, check=False)
    res = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, env=env,
                         capture_output=True, text=True)
    counts, survivors = {}, []
    for line in res.stdout.splitlines():
        m = re.match(r"\s*(\S+): (\w[\w ]*)$", line)
        if not m:
            continue
        mutant, status = m.group(1), m.group(2).strip()
        counts[status] = counts.get(status, 0) + 1
        if status == "survived":
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=work, env=env,
                                  capture_output=True, text=True).stdout
            survivors.append((mutant, diff.strip()))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    caught = counts.get("killed", 0) + counts.get("timeout", 0)
    effective = caught + counts.get("survived", 0)
    return {"name": name, "counts": counts, "score": caught / effective if effective else None,
            "survivors": survivors, "commit": commit}


def run_triton_mutants() -> list[dict]:
    out = []
    for name, rel, orig, mutated, sel in TRITON_MUTANTS:
        path = ROOT / rel
        text = path.read_text()
        if orig not in text:
            out.append({"name": name, "status": "not applicable: the code changed; update tools/mutation.py"})
            continue
        try:
            path.write_text(text.replace(orig, mutated, 1))
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sel], cwd=ROOT,
                               capture_output=True, text=True)
        finally:
            path.write_text(text)
        out.append({"name": name, "status": "caught" if r.returncode == 1 else f"SURVIVED (pytest rc {r.returncode})"})
        print(f"== triton mutant '{name}': {out[-1]['status']}", flush=True)
    return out


RESULTS_JSON = ROOT / "benchmarks" / "results" / "mutation.json"  # per module, merged across invocations
# mutant name -> why it survives; a key naming a function (``module.x_func``) covers its mutants not named alone
REASONS_JSON = ROOT / "benchmarks" / "results" / "mutation_reasons.json"


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _change(mutant: str, diff: str) -> tuple:
    """A survivor's identity across runs: its function and the lines the mutant changed (mutmut numbers the
    mutants of a function afresh whenever the function changes)."""
    body = tuple(line.strip() for line in diff.splitlines()
                 if line[:1] in "+-" and not line.startswith(("+++", "---")))
    return mutant.rsplit("__mutmut_", 1)[0], body


def _carry_reasons(old: list, new: list, reasons: dict) -> int:
    """Give each new survivor without a reason the reason of an old survivor with the same ``_change``."""
    by_change = {_change(m, d): reasons[m] for m, d in old if m in reasons}
    n = 0
    for m, d in new:
        why = by_change.get(_change(m, d))
        if m not in reasons and why is not None:
            reasons[m] = why
            n += 1
    return n


def write_report(results: list[dict], triton: list[dict]) -> Path:
    """Merge this invocation's modules into mutation.json (each keeps its own date and commit) and write
    mutation.md from all of them, with the reason recorded in mutation_reasons.json for each survivor."""
    import json

    store = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {"modules": {}, "triton": []}
    stamp = {"date": dt.date.today().isoformat(), "commit": _commit()}
    reasons = json.loads(REASONS_JSON.read_text()) if REASONS_JSON.exists() else {}
    carried = 0
    for r in results:
        if not any(r["counts"].get(k) for k in ("killed", "timeout", "survived")):
            # mutmut's clean run failed (no mutant was tested): keep the last real result, say so
            print(f"== {r['name']}: no mutant tested (the clean test run failed); keeping the stored result",
                  flush=True)
            continue
        old = store["modules"].get(r["name"], {}).get("survivors", [])
        carried += _carry_reasons(old, r["survivors"], reasons)
        store["modules"][r["name"]] = {**stamp, **r}  # the run's own commit wins over HEAD at report time
    if triton:
        store["triton"] = [{**t, **stamp} for t in triton]
    RESULTS_JSON.write_text(json.dumps(store, indent=1) + "\n")
    if carried:
        print(f"== {carried} reasons carried over to renumbered survivors (same function, same change)", flush=True)
        REASONS_JSON.write_text(json.dumps(reasons, indent=1, ensure_ascii=False))
    mods = [store["modules"][n] for n in MODULES if n in store["modules"]]
    lines = ["# Mutation testing (mutmut, CPU)", "",
             "`bash tools/mutation.sh [MODULE ...]` (outside CI). Score = (killed + timed out) / (killed + timed out +",
             "survived); mutants on lines no selected test runs are not generated (`mutate_only_covered_lines`);",
             "error-message strings of raise/warn statements are not mutated. Each module's row has the date and",
             "commit it was run at; the reason for each survivor is kept in `mutation_reasons.json`.", "",
             "| module | date | commit | mutants | killed | timeout | survived | score |", "|---|---|---|---|---|---|---|---|"]
    for r in mods:
        c = r["counts"]
        score = f"{100 * r['score']:.1f} %" if r["score"] is not None else "-"
        if c.get("not checked"):  # an interrupted run: the score is over the mutants it tested
            score += f" (partial: {sum(c.values()) - c['not checked']} of {sum(c.values())} tested)"
        lines.append(f"| {r['name']} | {r['date']} | {r['commit']} | {sum(c.values())} | {c.get('killed', 0)} | "
                     f"{c.get('timeout', 0)} | {c.get('survived', 0)} | {score} |")
    missing = [n for n in MODULES if n not in store["modules"]]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (`bash tools/mutation.sh {' '.join(missing)}`)."]
    lines += ["", "## Hand-planted Triton mutants (interpreter)", ""]
    lines += [f"- {t['name']}: {t['status']} ({t['date']}, {t['commit']})" for t in store["triton"]]
    for r in mods:
        if r["survivors"]:
            lines += ["", f"## Survivors: {r['name']}", ""]
            for mutant, diff in r["survivors"]:
                prefix = max((k for k in reasons if mutant.startswith(k + "__mutmut_")), key=len, default=None)
                why = reasons.get(mutant) or (reasons[prefix] if prefix else "_to be classified (equivalent, or a test owed)_")
                lines += [f"### {mutant}", "", f"reason: {why}", "", "```diff", diff, "```", ""]
    out = ROOT / "benchmarks" / "results" / "mutation.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help=f"subset of: {', '.join(MODULES)} (default: all)")
    p.add_argument("--list", action="store_true", help="list the modules (those named, else all) and their tests")
    p.add_argument("--keep", action="store_true", help="keep the scratch directories")
    p.add_argument("--no-triton", action="store_true", help="skip the hand-planted Triton mutants")
    p.add_argument("--report", action="store_true",
                   help="run nothing: rewrite mutation.md from mutation.json and mutation_reasons.json (after "
                        "classifying survivors)")
    a = p.parse_args(argv)
    bad = [m for m in a.modules if m not in MODULES]
    if bad:
        p.error(f"modules: unknown {bad}; choose from {', '.join(MODULES)}")
    if a.report and a.list:
        p.error("--report: rewrites mutation.md; --list only lists the modules (give one of them)")
    if a.report:
        if a.modules:
            p.error(f"--report: rewrites the whole of mutation.md from mutation.json (every module); it takes no "
                    f"module names (got {' '.join(a.modules)})")
        print(f"wrote {write_report([], [])}")
        return 0
    if a.list:  # the modules named, or all of them
        for n, (paths, tests) in MODULES.items():
            if not a.modules or n in a.modules:
                print(f"{n}: {' '.join(paths)}  <-  {' '.join(tests)}")
        return 0
    for m in a.modules or MODULES:  # the report is rewritten after each module: an interrupted run keeps what it did
        print(f"wrote {write_report([run_module(m, a.keep)], [])}", flush=True)
    if not a.no_triton:
        print(f"wrote {write_report([], run_triton_mutants())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
