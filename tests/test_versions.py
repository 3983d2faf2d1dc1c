"""The version policy: pyproject's bounds and ``compat.TESTED_VERSIONS`` say the same, and a release outside
them gets one warning naming the tested range."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from expertlens import compat

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for req in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group()
        out[name.lower()] = req[len(name) :]
    return out


@pytest.mark.parametrize("package", sorted(compat.TESTED_VERSIONS))
def test_pyproject_bounds_are_the_tested_versions(package):
    low, high = compat.TESTED_VERSIONS[package]
    assert _requirements()[package] == f">={low},<{high}"


def test_every_runtime_dependency_has_an_upper_bound_except_torch():
    # torch is installed first, pinned, by the README's command (a CPU build); the others get a ceiling so a
    # future major release cannot reach a fresh install untested
    unbounded = [n for n, spec in _requirements().items() if "<" not in spec and n != "torch"]
    assert not unbounded, f"dependencies without an upper bound: {unbounded}"


def test_dev_tools_are_pinned_exactly():
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    loose = [req for req in dev if "==" not in req]
    assert not loose, f"dev tools not pinned to a tested version: {loose}"


@pytest.mark.parametrize(
    ("installed", "expected"),
    [
        ({"transformers": "5.25.0", "nnsight": "0.8.1"}, []),
        ({"transformers": "5.24.0", "nnsight": "0.8.1"}, ["transformers 5.24.0 (tested: >=5.25, <5.26)"]),
        ({"transformers": "5.25.3", "nnsight": "0.8.9"}, []),
        ({"transformers": "5.26.0", "nnsight": "0.8.1"}, ["transformers 5.26.0 (tested: >=5.25, <5.26)"]),
        ({"transformers": "5.26.0.dev0", "nnsight": "0.8.1"}, ["transformers 5.26.0.dev0 (tested: >=5.25, <5.26)"]),
        ({"transformers": "5.23.1", "nnsight": "0.9.0"},
         ["transformers 5.23.1 (tested: >=5.25, <5.26)", "nnsight 0.9.0 (tested: >=0.8.1, <0.9)"]),
        ({"transformers": "5.25.0"}, []),  # a package that is not installed is not reported
    ],
)
def test_untested_versions_names_each_package_outside_its_range(installed, expected):
    assert compat.untested_versions(installed) == expected


def test_the_installed_versions_are_tested():
    # the suite itself runs on a tested resolve (CI installs through pyproject's bounds)
    assert compat.untested_versions() == []


def test_an_untested_release_warns_once_in_one_line(monkeypatch):
    monkeypatch.setattr(compat, "_VERSIONS_CHECKED", False)
    monkeypatch.setattr(compat, "untested_versions", lambda: ["transformers 5.31.0 (tested: >=5.25, <5.26)"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compat.check_versions() == ["transformers 5.31.0 (tested: >=5.25, <5.26)"]
        assert compat.check_versions() == []
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "transformers 5.31.0 (tested: >=5.25, <5.26)" in messages[0] and "truth test" in messages[0]


def test_wrapping_a_model_checks_the_versions(monkeypatch):
    from expertlens import ExpertModel
    from expertlens.testing import tiny_model, tiny_tokenizer

    calls = []
    monkeypatch.setattr(compat, "_VERSIONS_CHECKED", False)
    monkeypatch.setattr(compat, "untested_versions", lambda: calls.append(1) or ["nnsight 0.9.0 (tested)"])
    with pytest.warns(UserWarning, match="nnsight 0.9.0"):
        ExpertModel(tiny_model("olmoe"), tiny_tokenizer()).restore()
    assert calls == [1]
