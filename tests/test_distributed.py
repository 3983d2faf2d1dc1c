"""expertlens under transformers' native distributed inference: ``torchrun --nproc-per-node 2`` on CPU (gloo).

The worker (tests/distributed/ep_worker.py) loads a tiny qwen3_moe checkpoint with
``DistributedConfig(tp_size=1, fsdp_size=2, ep_size=2)`` (expert parallel) or ``DistributedConfig(tp_size=2)``
(tensor parallel) and as one plain process, on every rank, traces the same prompts through both (rank-specific
under expert parallelism) and reports the largest difference of every MoE point, attention's sharded points and
the logits under interventions. Skipped (with the reason) where torch.distributed / gloo / torchrun are unavailable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "distributed" / "ep_worker.py"
CLI_WORKER = Path(__file__).parent / "distributed" / "cli_worker.py"
TOL = 1e-5


def _torchrun() -> list[str]:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not torch.distributed.is_gloo_available():
        pytest.skip("the gloo backend is not available in this torch build")
    try:
        from transformers.distributed import DistributedConfig  # noqa: F401
    except ImportError as e:
        pytest.skip(f"transformers has no native distributed inference here: {e}")
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from expertlens.testing import tiny_model

    folder = tmp_path_factory.mktemp("tiny-qwen3-moe")
    tiny_model("qwen3_moe").save_pretrained(folder)  # safetensors
    return folder


def _run_torchrun(args: list[str], port_offset: int, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [*_torchrun(), "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000 + port_offset),
           *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {timeout} s")


def _launch(checkpoint: Path, out: Path, mode: str) -> list[dict]:
    proc = _run_torchrun([str(WORKER), str(checkpoint), str(out), mode], {"ep": 1, "tp": 3}[mode])
    reports = []
    for rank in (0, 1):
        f = out / f"rank{rank}.json"
        assert f.exists(), f"rank {rank} wrote nothing (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        reports.append(json.loads(f.read_text()))
    return reports


def test_expert_parallel_points_equal_one_process(checkpoint, tmp_path):
    reports = _launch(checkpoint, tmp_path, "ep")
    for rep in reports:
        assert "error" not in rep, f"rank {rep['rank']}:\n{rep['error']}"
        assert rep["expert_parallel"], "the experts were not split across ranks: the test would prove nothing"
        pts = rep["points"]
        # every point of every MoE layer (2 layers x 8 experts x output/mask + 7 block points), the logits and
        # layer 0's attn.z / head_out / output
        assert len(pts) == 2 * (2 * 8 + 7) + 1 + 3, sorted(pts)
        bad = {k: v for k, v in pts.items() if isinstance(v, str) or v > TOL}
        assert not bad, f"rank {rep['rank']}: points differ from one process: {bad}"
        assert all(n >= 0 for n in rep["n_routed_slots"].values())
        assert sum(rep["n_routed_slots"].values()) > 0
        for name, diff in rep["interventions"].items():
            assert diff <= TOL, f"rank {rep['rank']}: {name} logits differ from one process by {diff}"
            # each edit moved the logits, so matching one process is not matching an unedited run
            assert rep["intervention_effect"][name] > 1e-3, name
    # the ranks traced different prompts: their values are their own, not a copy of rank 0's
    assert reports[0]["n_routed_slots"] != reports[1]["n_routed_slots"]


def test_tensor_parallel_points_equal_one_process(checkpoint, tmp_path):
    reports = _launch(checkpoint, tmp_path, "tp")
    for rep in reports:
        assert "error" not in rep, f"rank {rep['rank']}:\n{rep['error']}"
        assert rep["tensor_parallel"], "the experts' weights were not sharded: the test would prove nothing"
        pts = dict(rep["points"])
        # W_O is sharded: attn.head_out refuses up front, naming tensor parallelism (never a slice's einsum)
        assert pts.pop("0.attn.head_out") == "missing"
        assert "tensor parallelism" in rep["head_out"] and rep["head_out"].startswith("PointError"), rep["head_out"]
        assert len(pts) == 2 * (2 * 8 + 7) + 1 + 2, sorted(pts)
        bad = {k: v for k, v in pts.items() if isinstance(v, str) or v > TOL}
        assert not bad, f"rank {rep['rank']}: points differ from one process: {bad}"
        for name, diff in rep["interventions"].items():
            assert diff <= TOL, f"rank {rep['rank']}: {name} logits differ from one process by {diff}"
            assert rep["intervention_effect"][name] > 1e-3, name
        # a persistent edit at o_proj's input would see this rank's slice: refused, nothing left attached
        assert rep["sharded_edit"].startswith("PointError") and "shards" in rep["sharded_edit"], rep["sharded_edit"]
        assert rep["n_edits_after"] == 0
    # tensor-parallel ranks share one batch: the same values on both
    assert reports[0]["n_routed_slots"] == reports[1]["n_routed_slots"]


def test_tp_plan_lookup_shim_keeps_transformers_semantics():
    """The shim binds transformers' own plan matcher under the name nnsight 0.8.1 imports. Its assumption: the
    function keeps ``(name, plan, is_weight=True) -> style | None`` with layer numbers wildcarded; checked here on
    a hand-made plan, so a transformers that changes it fails this test instead of mis-sharding a trace."""
    from expertlens.compat import nnsight_tp_plan_lookup

    state = nnsight_tp_plan_lookup()
    if state == "unavailable":
        pytest.skip("this transformers has no distributed plan matcher (no tensor parallelism to support)")
    assert state in ("present", "bound")
    from transformers.distributed.tensor_parallel import _get_parameter_plan

    plan = {"layers.*.mlp.experts": "moe_tp_experts", "layers.*.self_attn.o_proj": "rowwise", "lm_head": "colwise"}
    assert _get_parameter_plan("layers.11.mlp.experts", plan, is_weight=False) == "moe_tp_experts"
    assert _get_parameter_plan("layers.0.self_attn.o_proj.weight", plan) == "rowwise"  # a weight: its module's
    assert _get_parameter_plan("layers.0.self_attn.o_proj.weight", plan, is_weight=False) is None
    assert _get_parameter_plan("layers.0.self_attn", plan, is_weight=False) is None
    assert _get_parameter_plan("lm_head", plan, is_weight=False) == "colwise"
    assert nnsight_tp_plan_lookup() == state  # idempotent


def _experts_rules(config, dist) -> dict[str, str]:
    """The experts' rules of the tensor-parallel plan a model of ``config`` loads with under ``dist`` (the
    model's plan, then ``dist``'s overrides, as transformers merges them)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plan = AutoModelForCausalLM.from_config(config).tp_plan | (dist.tp_plan or {})
    return {k: v for k, v in plan.items() if ".experts" in k}


def _without_experts_rules(config):
    """``config`` with transformers 5.25's plan: the experts' tensor-parallel rules gone (an instance override)."""
    plan = type(config).base_model_tp_plan or {}
    config.base_model_tp_plan = {k: v for k, v in plan.items() if ".experts" not in k}
    return config


@pytest.mark.parametrize("drop", [False, True], ids=["installed-plan", "plan-without-experts"])
def test_tensor_parallel_config_shards_the_experts(drop):
    """The loading config of ``--parallel tp`` gives the experts the rules transformers 5.24 shipped for qwen3_moe,
    whether the installed plan has them (5.24: nothing added) or not (5.25: added as overrides)."""
    pytest.importorskip("transformers.distributed")
    from expertlens.compat import tensor_parallel_config
    from expertlens.testing import tiny_config

    config = tiny_config("qwen3_moe")
    config = _without_experts_rules(config) if drop else config
    dist = tensor_parallel_config(config, 2)
    assert (dist.tp_size, dist.ep_size) == (2, 1)
    experts = "model.layers.*.mlp.experts"
    assert _experts_rules(config, dist) == {
        f"{experts}.gate_up_proj": "packed_colwise",
        f"{experts}.down_proj": "rowwise",
        experts: "moe_tp_experts",
    }


@pytest.mark.parametrize("case", ["layout", "style"])
def test_tensor_parallel_config_refuses_replicated_experts(case, monkeypatch):
    """Where the experts would be copied to every rank and cannot be split (gpt-oss's transposed, biased
    experts; a transformers without ``moe_tp_experts``), the config is refused in one line saying what to run."""
    pytest.importorskip("transformers.distributed")
    from expertlens import compat
    from expertlens.testing import tiny_config

    if case == "style":
        monkeypatch.setattr(compat, "_has_style", lambda name: name != "moe_tp_experts")
    config = _without_experts_rules(tiny_config("gpt_oss" if case == "layout" else "qwen3_moe"))
    with pytest.raises(ValueError) as info:
        compat.tensor_parallel_config(config, 2)
    msg = str(info.value)
    assert "\n" not in msg and "model.layers.*.mlp.experts" in msg and "run on one process" in msg, msg
    assert ("GptOssExperts" if case == "layout" else "'moe_tp_experts'") in msg, msg
    assert "ep_size=2" in msg, msg


def test_parallel_tp_refuses_replicated_experts_before_loading(tmp_path, capsys, monkeypatch):
    """``--parallel tp`` on an organism whose experts transformers cannot split tensor-parallel (gpt-oss): one
    line, exit status 2, before a model loads (no process group needed)."""
    pytest.importorskip("transformers.distributed")
    from expertlens import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = ["refusal", "--organism", "gptoss-refusal", "--out", str(tmp_path / "o"), "--parallel", "tp"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("expertlens: error: --parallel tp: GptOssForCausalLM"), err
    assert "run on one process" in err
    assert not (tmp_path / "o").exists()


def _close(a, b, path: str = "") -> list[str]:
    """Where two results.json trees differ (floats: within 1e-4 relative; the run's timings are not compared)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a if k != "timing" for d in _close(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if abs(a - b) <= 1e-4 * max(1.0, abs(a)) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.slow
def test_refusal_cli_under_torchrun_rank0_writes_single_process_results(tmp_path, capsys):
    """``expertlens refusal`` on the bundled organism, split tensor-parallel over 2 ranks: rank 0 writes the
    outputs, rank 1 writes nothing, and the results equal one process's (the same command without torchrun)."""
    from expertlens.cli import main

    argv = ["refusal", "--preset", "fast", "--n-train", "4", "--n-val", "2", "--n-test", "2", "--no-report",
            "--quiet"]  # fmt: skip
    audit = tmp_path / "audit"
    audit.mkdir()
    dist_out = tmp_path / "dist"
    proc = _run_torchrun([str(CLI_WORKER), str(audit), *argv, "--out", str(dist_out)], 7, timeout=400)
    log = (proc.stdout + proc.stderr)[-3000:]
    reports = {}
    for rank in (0, 1):
        f = audit / f"rank{rank}.json"
        assert f.exists(), f"rank {rank} did not finish (rc {proc.returncode}):\n{log}"
        reports[rank] = json.loads(f.read_text())
        assert reports[rank]["code"] == 0, f"rank {rank} exit status {reports[rank]['code']}:\n{log}"
    assert reports[1]["writes"] == [], f"rank 1 wrote under --out: {reports[1]['writes'][:5]}"
    assert any(w.endswith("results.json") for w in reports[0]["writes"]), reports[0]["writes"]
    assert proc.stdout.count("results: ") == 1, "the summary must be printed once (rank 0)"

    one_out = tmp_path / "one"
    assert main([*argv, "--out", str(one_out)]) == 0
    capsys.readouterr()
    one = json.loads((one_out / "results.json").read_text())
    dist = json.loads((dist_out / "results.json").read_text())
    assert sorted(p.name for p in dist_out.iterdir()) == sorted(p.name for p in one_out.iterdir())
    diffs = _close(one, dist)
    assert not diffs, f"tensor-parallel results differ from one process: {diffs[:10]}"


def test_parallel_flag_needs_torchrun(tmp_path, capsys, monkeypatch):
    from expertlens.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["refusal", "--out", str(tmp_path / "o"), "--parallel", "tp"]) == 2
    err = capsys.readouterr().err
    assert "torchrun" in err and "\n" not in err.strip()
    assert not (tmp_path / "o").exists()
