"""The documentation runs as written: every Python block of README.md and docs/*.md in a fresh interpreter,
every relative link resolves, and the docstring examples pass."""
import doctest
import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("**/*.md"))


# Optional packages a block may import -> the pip extra of setup.py that installs them.
EXTRAS = {"transformers": "integrations", "diffusers": "integrations", "sklearn": "demo"}


def needed_extras(code: str) -> dict[str, str]:
    """The optional packages ``code`` imports, each with its extra: ``{"transformers": "integrations"}``."""
    names = re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", code, re.M)
    return {n: EXTRAS[n] for n in dict.fromkeys(names) if n in EXTRAS}


def _python_blocks():
    for doc in DOCS:
        text = doc.read_text()
        for i, m in enumerate(re.finditer(r"```python\n(.*?)```", text, re.S)):
            line = text[:m.start()].count("\n") + 2
            extras = sorted(set(needed_extras(m.group(1)).values()))
            yield pytest.param(doc, m.group(1), id=f"{doc.relative_to(ROOT)}:{line}" + "".join(f"-needs-{e}" for e in extras))


def test_needed_extras_reads_the_imports():
    assert needed_extras("import torch\nfrom transformers import AutoModel\n  import diffusers.models as m\n") == \
        {"transformers": "integrations", "diffusers": "integrations"}
    assert needed_extras("import torch  # transformers and diffusers in a comment\nx = 'import sklearn'\n") == {}


@pytest.mark.parametrize("doc,code", list(_python_blocks()))
def test_python_block_runs_standalone(doc, code):
    # A block that imports an optional package runs where its extra is installed and skips, naming the extra,
    # where it is not (the CPU-only install has no [integrations]).
    missing = {n: e for n, e in needed_extras(code).items() if importlib.util.find_spec(n) is None}
    if missing:
        pytest.skip(f"{doc.name} block imports {', '.join(missing)}, not installed: the optional extra "
                    + " and ".join(f'`pip install --no-build-isolation -e ".[{e}]"`'
                                   for e in sorted(set(missing.values()))))
    # A reader copies one block into a fresh interpreter: no names from earlier blocks, the default
    # backends of a plain CPU session (no TRITON_INTERPRET, which the test session sets), repo root as cwd.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{doc.name} block failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"


def test_readme_has_examples():
    assert len([p for p in _python_blocks() if p.values[0].name == "README.md"]) >= 3


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = doc.read_text()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        if path and not (doc.parent / path).exists():
            bad.append(target)
    assert not bad, f"{doc.name}: links to missing files: {bad}"


@pytest.mark.parametrize("module", ["elit_kernels.attention", "elit_kernels.attention.plan", "elit_kernels.layout",
                                    "elit_kernels.models.elit_dit",
                                    "elit_kernels.models.config", "elit_kernels.models.blocks",
                                    "elit_kernels.official.budget", "elit_kernels.reference.attention",
                                    "elit_kernels.reference.modulate"])
def test_docstring_examples(module):
    res = doctest.testmod(importlib.import_module(module), extraglobs={"torch": importlib.import_module("torch")})
    assert res.attempted > 0 and res.failed == 0, res


def _pins(path: pathlib.Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, by lower-case name."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)$", line.split("#")[0].strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def _extras() -> dict[str, list[str]]:
    """setup.py's ``extras_require``, read without running setup.py."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py: no extras_require")


def test_pins_agree_everywhere():
    """One story of versions: requirements.txt (CI, full install), requirements-cpu.txt (the README's CPU path),
    setup.py's [integrations] extra and every version the README names agree."""
    full, cpu = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-cpu.txt")
    assert "torch" in full and "torch" in cpu, (full, cpu)
    integ = dict(x.split("==") for x in _extras()["integrations"])
    assert set(integ) == {"transformers", "diffusers"}, integ
    assert integ == {k: full.get(k) for k in integ}, (integ, full)  # the extra installs what CI tests
    readme = " ".join((ROOT / "README.md").read_text().split())
    for name, version in integ.items():
        assert set(re.findall(rf"{name} (\d+\.\d+\.\d+)", readme)) == {version}, name
    torch_cpu = cpu["torch"].split("+")[0]
    assert set(re.findall(r"torch(?:==| )(\d+\.\d+\.\d+)", readme)) <= {full["torch"], torch_cpu}
    assert f"torch {torch_cpu}'s CPU build" in readme and f"torch {full['torch']}'s CUDA build" in readme
    assert "pip install -r requirements-cpu.txt" in readme and "pip install -r requirements.txt" in readme
    assert "pip install -r requirements.txt" in (ROOT / ".ci" / "run").read_text()


def test_readme_lists_every_bench_target_with_its_limit():
    # The README's targets table once listed four of elit-bench's five targets: each target the report checks has
    # a row naming it, with its limit.
    from elit_kernels.bench import report

    limits = {"latency_ratio": report.LATENCY_TARGET, "ragged / dense": report.DENSE_TARGET,
              "mixed ragged": report.MIXED_TARGET, "one-pass CCFG": report.CCFG_TARGET,
              "sampling CCFG": report.SAMPLING_TARGET}
    assert set(limits) == set(report.TARGET_INFO), "a target was added: give it a row in the README and here"
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("**The targets.**"):]
    table = table[:table.index("\n\n", table.index("| target |"))]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith(("| target", "|---"))]
    assert len(rows) == len(limits), rows
    for key, limit in limits.items():
        name = report.TARGET_INFO[key]["name"]
        row = next((r for r in rows if r.startswith(f"| {name}")), None)
        assert row is not None, f"no README row for the target {name!r}"
        assert f"≤ {limit:.2f}×" in row, (name, row)
    assert "checks four ratios of the run (five with `--scenarios sampling`)" in table


def test_readme_backend_table_names_every_registered_backend():
    # Each backend the package registers has one row in the README's backend table, and the table's "default
    # dispatch" column says "no" exactly for those default dispatch never picks (Backend.default_eligible).
    code = ("from elit_kernels.attention import registered_backends\n"
            "for b in registered_backends(): print(b.name, int(b.default_eligible))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    eligible = {n: e == "1" for n, e in (line.split() for line in out.splitlines())}
    readme = (ROOT / "README.md").read_text()
    start = readme.index("| name | default dispatch |")
    rows = readme[start:readme.index("\n\n", start)].splitlines()[2:]
    listed = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name in re.findall(r"`([a-z_0-9]+)`", cells[0]):
            listed[name] = not re.match(r"(\*\*)?no\b", cells[1])
    assert set(listed) == set(eligible), (sorted(listed), sorted(eligible))
    wrong = {n for n in eligible if listed[n] != eligible[n]}
    assert not wrong, f"the README's default-dispatch column disagrees with Backend.default_eligible for {wrong}"
