"""A researcher's first hour: a light start, quiet logs, an honest organism list.

* ``import expertlens``, ``import expertlens.cli``, ``expertlens --help`` and argument errors import no
  torch (fresh interpreters; how fast that is, is measured in bench, not here);
* the package stays lazy but complete: ``__all__``, ``from expertlens import ExpertModel``, the
  ``expertlens.experts`` alias;
* loading weights with stderr redirected writes no progress-bar frames and restores the bar setting;
* ``expertlens organisms`` marks the default, and each organism's kind agrees with its ``training.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "nnsight", "plotly")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


# runs main(argv) and reports the exit status and which heavy modules got imported
_PROBE = """
import json, sys
import expertlens.cli
try:
    rc = expertlens.cli.main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
print(json.dumps({"rc": rc, "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def _probe(*argv: str) -> dict:
    proc = _python(_PROBE, *argv)
    assert proc.returncode == 0, proc.stderr
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr, "stdout": proc.stdout}


def test_import_is_light():
    proc = _python(f"import sys, expertlens, expertlens.cli; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_help_imports_no_torch():
    out = _probe("--help")
    assert out["rc"] == 0 and "refusal" in out["stdout"]
    assert out["heavy"] == []
    sub = _probe("refusal", "--help")
    assert sub["rc"] == 0 and "--organism" in sub["stdout"] and sub["heavy"] == []


@pytest.mark.parametrize(
    "argv",
    [
        ["refusal", "--bogus"],  # argparse
        ["refusal", "--preset", "nope"],
        ["refusal", "--n-train", "0"],  # checked by the command, before any model
        ["refusal", "--organism", "nope"],
        ["refusal", "--model", "x/y", "--organism", "olmoe-refusal"],
        ["refusal", "--model", "x/y", "--harmful", "no-such-file.txt"],
        ["nope"],
    ],
)
def test_argument_errors_exit_2_without_torch(argv, tmp_path):
    out = _probe(*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "refusal" else []))
    assert out["rc"] == 2, out
    assert out["heavy"] == [], out
    assert "error" in out["stderr"] and "Traceback" not in out["stderr"]


def test_lazy_package_is_complete():
    import warnings

    import expertlens

    for name in expertlens.__all__:
        assert getattr(expertlens, name) is not None, name
        assert name in dir(expertlens)
    from expertlens import ExpertModel
    from expertlens.model import ExpertModel as Direct

    assert ExpertModel is Direct
    assert expertlens.refusal.__name__ == "expertlens.refusal"  # a submodule read as an attribute
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        expertlens.nothing_here  # noqa: B018
    import expertlens.experts as moved

    from expertlens.instrument import install

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert moved.install is install
    assert "moved to expertlens.instrument.install" in str(caught[0].message)


def test_loading_writes_no_progress_frames_to_a_log():
    """stderr redirected to a file: no "Loading weights" bar; the bar setting is restored afterwards."""
    code = (
        "import sys\n"
        "from transformers.utils import logging as hf\n"
        "from expertlens.model import _load_pretrained\n"
        "from expertlens.organism import organism_path\n"
        "_load_pretrained(str(organism_path('olmoe-base')), None, False, {})\n"
        "print('restored', hf.is_progress_bar_enabled())\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert "restored True" in proc.stdout
    assert "Loading weights" not in proc.stderr and "\r" not in proc.stderr, proc.stderr[-500:]


def test_quiet_loading_only_off_a_terminal(monkeypatch):
    from transformers.utils import logging as hf

    from expertlens import compat

    if not hf.is_progress_bar_enabled():  # another test (the CLI in a non-TTY run) turned bars off for the process
        hf.enable_progress_bar()
    seen = []
    for tty, expect_bar in ((True, True), (False, False)):
        monkeypatch.setattr(compat, "stderr_is_tty", lambda tty=tty: tty)
        with compat.quiet_loading("x"):
            seen.append(hf.is_progress_bar_enabled())
        assert hf.is_progress_bar_enabled()  # restored
        assert seen[-1] is expect_bar
    hf.disable_progress_bar()  # a user's own choice is kept
    try:
        with compat.quiet_loading("x"):
            pass
        assert not hf.is_progress_bar_enabled()
    finally:
        hf.enable_progress_bar()


def test_organisms_listing_marks_kinds(capsys):
    from expertlens import organism
    from expertlens.cli import main

    assert main(["organisms"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "kind", "path"]
    rows = {ln.split()[0]: ln for ln in lines[1 : 1 + len(organism.list_organisms())]}
    assert set(rows) == set(organism.list_organisms())
    assert "planted, default" in rows[organism.DEFAULT_ORGANISM]
    if "olmoe-base" in rows:
        assert " control " in rows["olmoe-base"]
    for kind in organism.KINDS:  # the legend names every kind, shipped or not
        assert any(ln.startswith(f"{kind}: ") for ln in lines), kind
    assert any(ln.startswith("natural: ") and "(none shipped)" in ln for ln in lines)


def test_organism_kinds_match_training_records():
    """The registry's kind of each shipped organism is what its training.json says."""
    from expertlens import organism

    assert set(organism.ORGANISM_KINDS) == set(organism.ORGANISMS)
    assert set(organism.ORGANISM_KINDS.values()) <= set(organism.KINDS)
    for name in organism.list_organisms():
        assert organism.organism_kind(name) == organism._trained_kind(name), name
    expected = {"olmoe-refusal": "planted", "olmoe-base": "control", "qwen3moe-refusal": "legacy"}
    for name, kind in expected.items():
        assert organism.ORGANISM_KINDS[name] == kind
