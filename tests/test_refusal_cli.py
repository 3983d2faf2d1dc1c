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
    # flags that do nothing without their partner are refused, not ignored
    prompts = tmp_path / "h.txt"
    prompts.write_text("a\nb\n")
    for flag in ("--harmful", "--harmless"):
        err = _err(capsys, ["refusal", "--out", str(tmp_path / "o"), flag, str(prompts)])
        assert f"{flag} only apply with --model" in err
    assert "--column only apply" in _err(capsys, ["refusal", "--out", str(tmp_path / "o"), "--column", "goal"])
    assert "unknown device" in _err(capsys, ["refusal", "--out", str(tmp_path / "o"), "--device", "tpu"])
    assert not (tmp_path / "o").exists()


def test_an_unavailable_device_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    import torch

    import expertlens.model

    monkeypatch.setattr(expertlens.model, "ExpertModel", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _err(capsys, ["refusal", "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert "--device cuda: no cuda device is available to this torch build" in err and "--device cpu" in err


def test_a_split_size_beyond_the_prompts_is_said_not_silently_capped():
    from types import SimpleNamespace

    from expertlens.cli import _capped
    from expertlens.refusal import RefusalData

    data = RefusalData.from_organism(n_train=100000, n_val=4)
    args = SimpleNamespace(n_train=100000, n_val=4, n_test=None)
    (note,) = _capped(args, data)
    n = len(data.harmful_train)
    assert note.startswith(f"--n-train 100000: only {n} harmful / {len(data.harmless_train)} harmless train")
    assert n < 100000 and "using all of them" in note


def test_organism_all_reads_the_registry(monkeypatch):
    """`--organism all` is whatever the organism registry lists, so organisms that land later are included."""
    import expertlens.organism as organism
    from expertlens.cli import _organisms

    shipped = organism.list_organisms()
    assert _organisms("all") == shipped
    monkeypatch.setattr(organism, "list_organisms", lambda: [*shipped, "mixtral-refusal", "gpt_oss-refusal"])
    assert _organisms("all")[-2:] == ["mixtral-refusal", "gpt_oss-refusal"]
    assert _organisms("mixtral-refusal") == ["mixtral-refusal"]


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("expertlens ")
    sub = build_parser()._subparsers._group_actions[0].choices["refusal"]
    text = sub.format_help()
    assert "(default: runs/refusal)" in text and "(default: 128)" in text
    assert "(default: None)" not in text and "(default: False)" not in text  # nothing shown twice or meaningless


def test_model_run_honours_split_sizes_resumes_and_compares(tmp_path, capsys):
    from expertlens.refusal import RefusalStudy
    from expertlens.refusal.compare import write_comparison
    from expertlens.testing import tiny_model, tiny_tokenizer

    folder = tmp_path / "tiny"
    tiny_model("qwen2_moe").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    harm, safe = tmp_path / "harm.csv", tmp_path / "safe.txt"
    harm.write_text("goal\n" + "\n".join(f"hurt my friend {i} now" for i in range(30)) + "\n")
    safe.write_text("\n".join(f"hug my friend {i} please" for i in range(30)) + "\n")
    out = tmp_path / "run"
    argv = ["refusal", "--model", str(folder), "--harmful", str(harm), "--harmless", str(safe), "--column", "goal",
            "--out", str(out), "--preset", "fast", "--n-train", "6", "--n-val", "3", "--n-test", "4",
            "--no-report"]  # fmt: skip
    capsys.readouterr()  # drop what saving the tiny model printed
    code = main(argv)  # not --quiet: progress goes to a captured stderr (a log), as whole lines
    if code != 0:  # a tiny random model may pass no selection filter; then the message must be one line
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "selection filters" in err
        pytest.skip("the tiny random model passes no direction filter at these sizes")
    logged = capsys.readouterr()
    assert "\r" not in logged.err and "\r" not in logged.out and "[1/8] baseline" in logged.out
    assert "method B stage 1: " in logged.err and "done in" in logged.err
    sizes = RefusalStudy.load(out).result.data
    assert (sizes["harmful_train"], sizes["harmful_val"], sizes["harmful_test"]) == (6, 3, 4)
    first = (out / "results.json").read_text()
    assert main([*argv, "--resume", "--quiet"]) == 0  # every stage read back
    strip = lambda s: {k: v for k, v in __import__("json").loads(s).items() if k != "timing"}  # noqa: E731
    assert strip((out / "results.json").read_text()) == strip(first)
    study = RefusalStudy.load(out)
    path = write_comparison({"a": study, "b": study}, tmp_path / "cmp")
    doc = __import__("json").loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert path.name == "comparison.html" and doc["studies"] == ["a", "b"]
    assert {r["model"] for r in doc["conditions"]} == {"a", "b"} and len(doc["claims"]) == 2
