"""expertlens under transformers' native distributed inference: ``torchrun --nproc-per-node 2`` on CPU (gloo).

The worker (tests/distributed/ep_worker.py) loads a tiny qwen3_moe checkpoint with
``DistributedConfig(tp_size=1, fsdp_size=2, ep_size=2)`` and as one plain process, on every rank, traces
rank-specific prompts through both and reports the largest difference of every MoE point and of the logits
under interventions. Skipped (with the reason) where torch.distributed / gloo / torchrun are unavailable.
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


def _launch(checkpoint: Path, out: Path, mode: str) -> list[dict]:
    cmd = [*_torchrun(), "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000 + len(mode)),
           str(WORKER), str(checkpoint), str(out), mode]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish within 300 s")
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
        # every point of every MoE layer (2 layers x 8 experts x output/mask + 7 block points) and the logits
        assert len(pts) == 2 * (2 * 8 + 7) + 1, sorted(pts)
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


def test_tensor_parallel(checkpoint, tmp_path):
    reports = _launch(checkpoint, tmp_path, "tp")
    for rep in reports:
        if "_get_parameter_plan" in rep.get("error", ""):
            pytest.skip(
                "nnsight 0.8.1 cannot wrap a tensor-parallel model of transformers 5.24 (it imports "
                "transformers.distributed.tensor_parallel._get_parameter_plan, which 5.24 removed)"
            )
        assert "error" not in rep, f"rank {rep['rank']}:\n{rep['error']}"
        bad = {k: v for k, v in rep["points"].items() if isinstance(v, str) or v > TOL}
        assert not bad, f"rank {rep['rank']}: points differ from one process: {bad}"
        assert max(rep["interventions"].values()) <= TOL
