"""The environment switches are read one way (elit_kernels/_env.py): ``off`` is off, junk is an error naming the
variable, never a silent default or the opposite of what was asked."""
import subprocess
import sys

import pytest

from elit_kernels._env import env_choice, env_flag


@pytest.mark.parametrize("raw,want", [("1", True), ("true", True), ("Yes", True), (" ON ", True), ("0", False),
                                      ("false", False), ("No", False), ("off", False), ("OFF", False)])
def test_a_switch_reads_every_spelling(monkeypatch, raw, want):
    monkeypatch.setenv("ELIT_TEST_SWITCH", raw)
    assert env_flag("ELIT_TEST_SWITCH", not want) is want


@pytest.mark.parametrize("default", [True, False])
def test_unset_or_empty_is_the_default_and_junk_is_named(monkeypatch, default):
    monkeypatch.delenv("ELIT_TEST_SWITCH", raising=False)
    assert env_flag("ELIT_TEST_SWITCH", default) is default
    monkeypatch.setenv("ELIT_TEST_SWITCH", "  ")
    assert env_flag("ELIT_TEST_SWITCH", default) is default
    monkeypatch.setenv("ELIT_TEST_SWITCH", "maybe")
    with pytest.raises(ValueError, match=r"^\$ELIT_TEST_SWITCH: expected 1/true/yes/on or 0/false/no/off \(any case\), "
                                         rf"or unset for the default \({'on' if default else 'off'}\), got 'maybe'"):
        env_flag("ELIT_TEST_SWITCH", default)


def test_a_mode_is_one_of_its_choices(monkeypatch):
    monkeypatch.setenv("ELIT_TEST_MODE", "ON")
    assert env_choice("ELIT_TEST_MODE", ("auto", "on", "off"), "auto") == "on"
    monkeypatch.setenv("ELIT_TEST_MODE", "")
    assert env_choice("ELIT_TEST_MODE", ("auto", "on", "off"), "auto") == "auto"
    monkeypatch.setenv("ELIT_TEST_MODE", "1")
    with pytest.raises(ValueError, match=r"^\$ELIT_TEST_MODE: expected one of auto, on, off \(any case\), or unset for "
                                         r"'auto', got '1'"):
        env_choice("ELIT_TEST_MODE", ("auto", "on", "off"), "auto")


def _read(env: dict, expr: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import elit_kernels; print({expr})"], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, **env})


@pytest.mark.parametrize("var,expr", [
    ("ELIT_TUNE", "elit_kernels.attention.dispatch._tuning"),
    ("ELIT_VALIDATE", "elit_kernels.value_checks_enabled()"),
    ("ELIT_POISON_OUTPUTS", "elit_kernels._outputs.poison_outputs_enabled()"),
])
def test_the_package_switches_read_off_as_off(var, expr):
    for raw, want in (("off", "False"), ("No", "False"), ("on", "True")):
        r = _read({var: raw}, expr)
        assert r.returncode == 0 and r.stdout.split()[-1] == want, (var, raw, r.stdout, r.stderr[-2000:])
    r = _read({var: "perhaps"}, expr)
    assert r.returncode != 0 and f"${var}: expected 1/true/yes/on" in r.stderr, r.stderr[-2000:]
