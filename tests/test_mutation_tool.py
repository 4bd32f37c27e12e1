"""``tools/mutation.py``'s bookkeeping without running mutmut: a survivor's reason follows it when mutmut numbers
its function's mutants afresh, and only to a mutant that makes the same change in the same function."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("mutation_tool", os.path.join(ROOT, "tools", "mutation.py"))
M = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(M)


def _diff(minus, plus):
    return f"# m: survived\n--- a.py\n+++ a.py\n@@ -1,2 +1,2 @@\n def f():\n-{minus}\n+{plus}"


def test_a_reason_follows_the_same_change_in_the_same_function_only():
    old = [("pkg.x_f__mutmut_3", _diff("    x = 1", "    x = 2")), ("pkg.x_f__mutmut_4", _diff("    y = 1", "    y = 0"))]
    reasons = {"pkg.x_f__mutmut_3": "equivalent: x is overwritten", "pkg.x_g__mutmut_1": "kept"}
    new = [("pkg.x_f__mutmut_7", _diff("    x = 1", "    x = 2")),   # renumbered: carried
           ("pkg.x_g__mutmut_2", _diff("    x = 1", "    x = 2")),   # same change, other function: not carried
           ("pkg.x_f__mutmut_8", _diff("    y = 1", "    y = 0")),   # old survivor had no reason: nothing to carry
           ("pkg.x_f__mutmut_9", _diff("    x = 1", "    x = 3"))]   # another change: not carried
    assert M._carry_reasons(old, new, reasons) == 1
    assert reasons == {"pkg.x_f__mutmut_3": "equivalent: x is overwritten", "pkg.x_g__mutmut_1": "kept",
                       "pkg.x_f__mutmut_7": "equivalent: x is overwritten"}
    reasons["pkg.x_f__mutmut_9"] = "own"
    assert M._carry_reasons(old, new, reasons) == 0 and reasons["pkg.x_f__mutmut_9"] == "own"  # never overwritten
