"""The refusal command line: every input checked before a model loads, one-line errors with exit 2."""

from __future__ import annotations

import pytest

from expertlens.cli import build_parser, main


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("expertlens: error: ")
    assert "Traceback" not in err
    return err


def test_bad_inputs_fail_fast_with_one_line(tmp_path, capsys, monkeypatch):
    import expertlens.model

    def no_load(*a, **k):  # any model load would be a bug: inputs are checked first
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(expertlens.model, "ExpertModel", no_load)
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert "is not a folder" in _err(capsys, ["refusal", "--out", str(afile)])
    assert "no unfinished run" in _err(capsys, ["refusal", "--out", str(tmp_path / "new"), "--resume"])
    assert "unknown ['nope']" in _err(capsys, ["refusal", "--out", str(tmp_path / "o"), "--organism", "nope"])
    assert "pass --harmful FILE" in _err(capsys, ["refusal", "--out", str(tmp_path / "o"), "--model", "x/y"])
    assert "no such file" in _err(
        capsys, ["refusal", "--out", str(tmp_path / "o"), "--model", "x/y", "--harmful", "nofile.txt"]
    )
    assert "no such folder" in _err(capsys, ["refusal", "--out", str(tmp_path / "o"), "--model", "./nowhere"])
    assert "positive integer" in _err(capsys, ["refusal", "--out", str(tmp_path / "o"), "--n-train", "0"])
    csv = tmp_path / "h.csv"
    csv.write_text("goal,other\nhurt him,1\n")
    assert "none of the columns ['behaviour']" in _err(
        capsys,
        ["refusal", "--out", str(tmp_path / "o"), "--model", "x/y", "--harmful", str(csv), "--harmless", str(csv),
         "--column", "behaviour"],
    )  # fmt: skip
    few = tmp_path / "few.txt"
    few.write_text("a\nb\nc\n")
    assert "cannot be split" in _err(
        capsys,
        ["refusal", "--out", str(tmp_path / "o"), "--model", "x/y", "--harmful", str(few), "--harmless", str(few)],
    )
    assert not (tmp_path / "o").exists()


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("expertlens ")
    sub = build_parser()._subparsers._group_actions[0].choices["refusal"]
    text = sub.format_help()
    assert "(default: runs/refusal)" in text and "(default: 128)" in text
