"""Smoke test of the benchmarks: ``bench/run.py --quick`` (tiny config, one round) writes every row.

No timed assertions: only that each section ran and the JSON is complete and well formed.
"""

from __future__ import annotations

import json
import math

import pytest

run = pytest.importorskip("bench.run")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    docs = out.parent / "perf.md"
    docs.write_text("# Performance\n\nintro\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\nrerun notes\n")
    result = run.run(quick=True, out=out, docs=docs, log=lambda *a: None)
    return result, json.loads(out.read_text()), docs.read_text()


def test_every_row_present(quick):
    _, data, _ = quick
    ids = [r["id"] for r in data["rows"]]
    assert ids == run.expected_row_ids(quick=True)
    assert len(set(ids)) == len(ids)


def test_synthetic_rows_measured(quick):
    _, data, _ = quick
    for r in data["rows"]:
        if r["setting"] != "tiny":
            continue
        assert "skipped" not in r and "error" not in r, r
        if r["section"] in ("forward", "generate", "extract"):
            assert r["wall_s"] > 0 and r["cpu_s"] >= 0 and r["rounds"] == 1
            assert len(r["wall_samples"]) == 1
            assert r["ratio"] is not None and math.isfinite(r["ratio"])
        if r["section"] == "memory":
            assert r["estimate_bytes"] == r["saved_bytes"] > 0
            assert r["saved_shape"][-2:] == [r["k"], r["d_model"]]


def test_targets_and_checks(quick):
    _, data, _ = quick
    targets = {t["id"] for t in data["targets"]}
    assert {
        "forward/tiny/trace_nothing", "forward/tiny/trace_capture", "generate/tiny/expertlens_steered",
        "generate/tiny/hooks_nocache", "extract/tiny/expertlens",
    } <= targets
    rows = {r["id"]: r for r in data["rows"]}
    # the two copies are the same weights, and expertlens is bit-identical to grouped_mm
    assert rows["forward/tiny/bare"]["max_abs_diff_vs_wrapped"] == 0.0
    assert rows["generate/tiny/expertlens_plain"]["tokens_identical_to_bare"]
    assert rows["extract/tiny/expertlens"]["max_abs_diff_vs_plain"] < 1e-4
    assert rows["generate/tiny/bare"]["new_tokens"] == 4


def test_startup_rows(quick):
    """Start-up is measured in fresh interpreters against ``import torch`` (targets live here, not in tests)."""
    _, data, docs = quick
    rows = {r["id"]: r for r in data["rows"] if r["section"] == "startup"}
    assert list(rows) == [f"startup/python/{k}" for k in ("torch_import", "expertlens_import", "cli_help")]
    for r in rows.values():
        assert "error" not in r and r["wall_s"] > 0 and r["cpu_samples"], r
    targets = {t["id"]: t for t in data["targets"]}
    for key in ("expertlens_import", "cli_help"):
        assert math.isfinite(targets[f"startup/python/{key}"]["value"])
        assert "import torch" in targets[f"startup/python/{key}"]["target"]
    assert "`expertlens --help`" in docs


def test_organism_rows_marked(quick):
    _, data, _ = quick
    for r in data["rows"]:
        if r["setting"] == "organism" and r["section"] == "e2e":
            assert "skipped" in r  # never run in --quick
        elif r["setting"] == "organism" and "skipped" not in r:
            assert "error" not in r, r


def test_docs_block_rewritten(quick):
    _, _, docs = quick
    assert "old" not in docs and "intro" in docs and "rerun notes" in docs
    assert "| row | setting |" in docs and "capture memory" in docs


def _run_json(module: str, argv: list[str], tmp_path):
    """``module.run(argv + --out)``: the JSON it wrote (checked equal to what it returned)."""
    mod = pytest.importorskip(module)
    out = tmp_path / "out.json"
    result = mod.run([*argv, "--out", str(out)], log=lambda *a: None)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    return mod, data


def test_gpu_bench_runs_on_cpu_tiny(tmp_path):
    """``bench/gpu.py --device cpu --tiny`` runs the GPU benchmark's code end to end on tiny configs."""
    gpu, data = _run_json("bench.gpu", ["--device", "cpu", "--tiny"], tmp_path)
    assert [c["name"] for c in data["configs"]] == list(gpu.CONFIGS)
    for c in data["configs"]:
        assert "error" not in c, c.get("error")
        assert c["max_abs_diff_bare_vs_wrapped"] == 0.0  # shared weights, bit-identical experts function
        assert set(c["ratios"]) >= {"trace_nothing", "trace_capture", "generate_steered_vs_hooks"}
        for key in ("trace_nothing", "trace_capture", "trace_addvector", "all_moe", "every"):  # ÷ plain nnsight
            assert math.isfinite(c["points"][key]["vs_nnsight"]), (key, c["points"][key])
        assert all(math.isfinite(v) and v > 0 for v in c["tokens_per_s"].values())
        # expertlens' steering and the plain pre-hook reference produce the same tokens
        assert c["token_agreement_steered_vs_hooks"] == 1.0


def test_points_bench_runs_on_cpu_tiny(tmp_path):
    """``python -m bench.points --tiny``: every point's variant, the groups and their plain-nnsight twins run."""
    points, data = _run_json("bench.points", ["--tiny", "--only", "olmoe-1b-7b,deepseek-v3"], tmp_path)
    for c in data["configs"]:
        r = c["ratios"]
        assert {"trace_nothing", "all_moe", "every", "every_but_heads", "point:attn.head_out"} <= set(r)
        for key in ("trace_nothing", "all_moe", "every"):
            assert math.isfinite(r[key]["vs_bare"]) and math.isfinite(r[key]["vs_nnsight"]), (key, r[key])
        assert c["saved_bytes"]["every"] > c["saved_bytes"]["all_moe"] > 0
    assert "point:moe.shared_out" in data["configs"][1]["ratios"]  # DeepSeek-V3 has a shared expert
    assert "| `every` |" in points.table(data["configs"])
